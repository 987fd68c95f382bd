// Headers every kernel file needs before it switches its target ISA (see adam_element.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "adam.h"

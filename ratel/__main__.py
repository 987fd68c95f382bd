"""``python -m ratel plan|bench``: see ratel/cli.py."""
import sys

from ratel.cli import main

sys.exit(main())

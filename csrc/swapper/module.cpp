// Python bindings of the native swapper (ratel._swapper). The public face is ratel/runtime/swapper.py;
// this layer only converts types and releases the GIL around everything that can block.
#include <cstring>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "swapper.h"

namespace py = pybind11;
using namespace ratel::swapper;

namespace {

OpKind parse_op(const std::string& op) {
  if (op == "read") return OpKind::Read;
  if (op == "write") return OpKind::Write;
  throw std::invalid_argument("op must be 'read' or 'write', not '" + op + "'");
}

py::dict stats_dict(const Engine& e) {
  const EngineStats& s = e.stats();
  py::dict d;
  d["requests"] = s.requests.load();
  d["chunks"] = s.chunks.load();
  d["bytes_read"] = s.bytes_read.load();
  d["bytes_written"] = s.bytes_written.load();
  d["direct_bytes"] = s.direct_bytes.load();
  d["buffered_bytes"] = s.buffered_bytes.load();
  d["bounce_bytes"] = s.bounce_bytes.load();
  d["resumed_partial"] = s.resumed_partial.load();
  d["failed_requests"] = s.failed_requests.load();
  d["checksum_verified"] = s.checksum_verified.load();
  d["backend_degraded"] = s.backend_degraded.load() != 0;
  return d;
}

}  // namespace

PYBIND11_MODULE(_swapper, m) {
  m.doc() = "Native NVMe swapper (see ratel/runtime/swapper.py for the Python face).";
  m.attr("ALIGNMENT") = kAlignment;

  // Errors outside requests (opening files, creating the ring) become OSError with errno and filename,
  // which the Python face turns into SwapIOError.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const OsError& e) {
      py::object filename = e.path.empty() ? py::object(py::none()) : py::object(py::str(e.path));
      py::object exc = py::module_::import("builtins").attr("OSError")(e.err, std::strerror(e.err), filename);
      PyErr_SetObject(PyExc_OSError, exc.ptr());
    }
  });

  py::class_<SwapFile, std::shared_ptr<SwapFile>>(m, "File")
      .def_property_readonly("name", [](const SwapFile& f) { return f.name; })
      .def_property_readonly("nbytes", [](const SwapFile& f) { return f.nbytes; })
      .def_property_readonly("paths", [](const SwapFile& f) {
        std::vector<std::string> v;
        for (const FilePart& p : f.parts) v.push_back(p.path);
        return v;
      })
      .def_property_readonly("direct", [](const SwapFile& f) {
        std::vector<bool> v;
        for (const FilePart& p : f.parts) v.push_back(p.direct_fd >= 0);
        return v;
      });

  py::class_<Request, std::shared_ptr<Request>>(m, "Request")
      .def("done", &Request::done)
      .def("wait", &Request::wait, py::arg("timeout") = -1.0, py::call_guard<py::gil_scoped_release>(),
           "Blocks until done or until 'timeout' seconds pass (< 0: forever); returns done().")
      .def("error", [](Request& r) -> py::object {
        if (!r.done() || r.error.err == 0) return py::none();
        const RequestError& e = r.error;
        return py::make_tuple(e.err, e.detail, e.path, e.physical, e.logical);
      }, "None, or (errno, detail, path, physical offset, logical offset) of the failure at the lowest offset.");

  py::class_<Engine>(m, "Engine")
      .def(py::init([](const std::string& backend, uint64_t block_size, int queue_depth, bool checksum) {
             EngineConfig c;
             c.backend = backend;
             c.block_size = block_size;
             c.queue_depth = queue_depth;
             c.checksum = checksum;
             return std::make_unique<Engine>(c);
           }),
           py::arg("backend"), py::arg("block_size"), py::arg("queue_depth"), py::arg("checksum") = false)
      .def_property_readonly("backend", &Engine::backend_name)
      .def_property_readonly("block_size", [](const Engine& e) { return e.config().block_size; })
      .def_property_readonly("queue_depth", [](const Engine& e) { return e.config().queue_depth; })
      .def("open_file", &Engine::open_file, py::arg("name"), py::arg("paths"), py::arg("nbytes"),
           py::arg("stripe"), py::arg("direct"), py::call_guard<py::gil_scoped_release>())
      .def("submit",
           [](Engine& e, const std::string& op, const std::shared_ptr<SwapFile>& f, uint64_t offset,
              uintptr_t addr, uint64_t nbytes) {
             OpKind kind = parse_op(op);
             py::gil_scoped_release release;
             return e.submit(kind, f, offset, reinterpret_cast<char*>(addr), nbytes);
           },
           py::arg("op"), py::arg("file"), py::arg("offset"), py::arg("addr"), py::arg("nbytes"))
      .def("drain", &Engine::drain, py::call_guard<py::gil_scoped_release>())
      .def("close", &Engine::close, py::call_guard<py::gil_scoped_release>())
      .def("inflight", &Engine::inflight)
      .def("stats", &stats_dict);

  m.def("uring_available", [] {
    std::string why;
    bool ok;
    {
      py::gil_scoped_release release;
      ok = uring_available(&why);
    }
    return py::make_tuple(ok, why);
  }, "(True, '') when io_uring works in this process, else (False, reason).");

  m.def("inject_fault",
        [](const std::string& op, std::optional<int> err, uint64_t after, uint64_t count, bool partial,
           double delay) {
          FaultOp fop;
          if (op == "read")
            fop = FaultOp::Read;
          else if (op == "write")
            fop = FaultOp::Write;
          else if (op == "open")
            fop = FaultOp::Open;
          else if (op == "uring_enter")
            fop = FaultOp::UringEnter;
          else
            throw std::invalid_argument("op must be 'read', 'write', 'open' or 'uring_enter'");
          if (err && *err < 0) throw std::invalid_argument("errno must be >= 0 or None");
          FaultInjector::instance().arm(fop, err ? *err : -1, after, count, partial, int64_t(delay * 1e9));
        },
        py::arg("op"), py::arg("errno"), py::arg("after") = 0, py::arg("count") = 1, py::arg("partial") = false,
        py::arg("delay") = 0.0,
        "Test hook: the (after+1)-th following `op` ('read', 'write', 'open' or 'uring_enter') syscall in this process, and "
        "count-1 more, fail as if the kernel returned -errno. errno=0 fakes a short transfer instead (0 bytes, "
        "or with partial=True half of them, so that the transfer is resumed); errno=None does not fail. "
        "delay (seconds) stalls the syscall first, keeping its request in flight.");
  m.def("clear_faults", [] { FaultInjector::instance().clear(); });
  m.def("hash64", [](py::buffer b, uint64_t seed) {
    py::buffer_info info = b.request();
    return hash64(info.ptr, size_t(info.size * info.itemsize), seed);
  }, py::arg("data"), py::arg("seed") = 0, "XXH64 of a bytes-like object (the per-block checksum).");
}

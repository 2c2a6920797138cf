// The Python module qadapter_kernels.ops._C_<ISA>: importing it runs the static TORCH_LIBRARY
// initialisers of ops.cpp (schemas) and of the kernel files (CPU kernels), as in
// pytorch/extension-cpp. setup.py builds it once per x86 vector ISA (QADAPTER_MODULE_NAME and
// CPU_CAPABILITY say which); qadapter_kernels/ops/native.py imports exactly one, so one process
// never holds two sets of CPU kernels. Its functions report the ISA and manage the kept output
// block (streaming_output.h).
#include <Python.h>

#include "streaming_output.h"

#define QADAPTER_STR_(x) #x
#define QADAPTER_STR(x) QADAPTER_STR_(x)
#define QADAPTER_CAT_(a, b) a##b
#define QADAPTER_CAT(a, b) QADAPTER_CAT_(a, b)

namespace {

PyObject* capability(PyObject*, PyObject*) { return PyUnicode_FromString(QADAPTER_STR(CPU_CAPABILITY)); }

PyObject* cached_output_bytes(PyObject*, PyObject*) {
  return PyLong_FromSize_t(qadapter::cached_output_bytes());
}

PyObject* release_cached_output(PyObject*, PyObject*) {
  return PyLong_FromSize_t(qadapter::release_cached_output());
}

PyObject* cached_output_limit(PyObject*, PyObject*) {
  return PyLong_FromSize_t(qadapter::cached_output_limit());
}

PyObject* set_cached_output_limit(PyObject*, PyObject* arg) {
  const size_t bytes = PyLong_AsSize_t(arg);
  if (bytes == static_cast<size_t>(-1) && PyErr_Occurred()) return nullptr;
  qadapter::set_cached_output_limit(bytes);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"capability", capability, METH_NOARGS, "The vector ISA these CPU kernels were compiled for."},
    {"cached_output_bytes", cached_output_bytes, METH_NOARGS, "Bytes of the kept output block (0: none)."},
    {"release_cached_output", release_cached_output, METH_NOARGS,
     "Returns the kept output block to the system; the bytes released."},
    {"cached_output_limit", cached_output_limit, METH_NOARGS, "The largest output block that may be kept."},
    {"set_cached_output_limit", set_cached_output_limit, METH_O,
     "Sets the largest output block that may be kept (0: none); a larger kept block is released."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, QADAPTER_STR(QADAPTER_MODULE_NAME), nullptr, -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC QADAPTER_CAT(PyInit_, QADAPTER_MODULE_NAME)(void) { return PyModule_Create(&module_def); }

// Registers the fused op's kernels with the PyTorch dispatcher as fastres_ext::forward and
// fastres_ext::backward (CPU always; CUDA when the extension was compiled with CUDA), plus
// fastres_ext::compiled_with_cuda() so Python can ask whether CUDA kernels are in this build.
// Loading the library needs no GPU: CUDA kernels only run when called with CUDA tensors.
//
// The ops write into tensors the caller allocates (Tensor(a!) arguments): the Python backends
// allocate them through fastres._alloc, so tests can poison them with NaN, and autograd is wired
// once, in Python, around the fastres::conv_bn_relu custom op that calls these.
#include <Python.h>
#include <torch/library.h>

#include "conv_bn_relu.h"

namespace fastres {
namespace {

bool compiled_with_cuda() {
#ifdef FASTRES_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

// csrc/cpu/stream_cpu.cpp: fastres._C.stream_step, the streaming step without the dispatcher.
PyMethodDef* stream_python_methods();
PyTypeObject* stream_step_type();  // fastres._C.StreamStep, a stream's step bound to its tensors

TORCH_LIBRARY(fastres_ext, m) {
  // docs/spec.md, "Backend contract". norm_mode: 0 none, 1 eval (normalize with the running
  // statistics), 2 train (batch statistics written to batch_mean/batch_var; running statistics,
  // when given, updated in place with momentum_factor). saved: x-hat (or y without batch norm)
  // when it has out's shape, else empty.
  m.def(
      "forward(Tensor x, Tensor weight, Tensor? bias, Tensor? gamma, Tensor? beta, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? residual, int stride, "
      "int dilation, int pad_left, int pad_right, int norm_mode, float eps, "
      "float momentum_factor, bool relu_before_add, int activation, float activation_param, "
      "Tensor(c!) out, Tensor(d!) saved, Tensor(e!) batch_mean, Tensor(f!) batch_var) -> ()");
  // activation: conv_bn_relu.h's ActivationCode (0: ReLU), with leaky_relu's slope or elu's
  // alpha as activation_param; it replaces every ReLU, and saved is then always written.
  // var: the variance forward normalized with. residual: the forward's, where an activation
  // other than ReLU follows the add. Gradients of absent inputs (bias, residual, batch-norm
  // affine) are empty tensors.
  m.def(
      "backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? gamma, Tensor? beta, "
      "Tensor saved, Tensor out, Tensor var, Tensor? residual, bool has_residual, int stride, "
      "int dilation, int pad_left, int pad_right, int norm_mode, float eps, "
      "bool relu_before_add, int activation, float activation_param, Tensor(a!) grad_x, "
      "Tensor(b!) grad_weight, Tensor(c!) grad_bias, Tensor(d!) grad_gamma, "
      "Tensor(e!) grad_beta, Tensor(f!) grad_residual) -> ()");
  m.def("compiled_with_cuda() -> bool", &compiled_with_cuda);
}

TORCH_LIBRARY_IMPL(fastres_ext, CPU, m) {
  m.impl("forward", &conv_bn_relu_forward_cpu);
  m.impl("backward", &conv_bn_relu_backward_cpu);
}

}  // namespace fastres

// A plain Python module, so `import fastres._C` loads the library (and runs the registrations
// above); everything else is reached through torch.ops.fastres_ext, except the streaming step,
// whose few microseconds are called from Python directly (fastres._C.stream_step).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastres C++/CUDA kernels (see torch.ops.fastres_ext)", -1,
      fastres::stream_python_methods()};
  PyObject* module = PyModule_Create(&module_def);
  PyTypeObject* step_type = module ? fastres::stream_step_type() : nullptr;
  if (step_type == nullptr || PyModule_AddObjectRef(module, "StreamStep",
                                                    reinterpret_cast<PyObject*>(step_type)) < 0) {
    Py_XDECREF(module);
    return nullptr;
  }
  return module;
}

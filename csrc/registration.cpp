// Every schema of the vsr_kernels library. Kernels are registered per device in
// cpu/<op>.cpp and cuda_glue/<op>.cpp; autograd and fake tensors in vsr_kernels/ops (Python).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import vsr_kernels._C` loads this library, which runs the TORCH_LIBRARY blocks below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(vsr_kernels, m) {
  m.def(
      "local_argmax_attention(Tensor query, Tensor key, Tensor value, int kernel_size, "
      "int dilation, float scale, bool zero_border) -> (Tensor out, Tensor score, Tensor index)");
  m.def(
      "local_argmax_attention_backward(Tensor grad_out, Tensor grad_score, Tensor query, "
      "Tensor key, Tensor value, Tensor score, Tensor index, int kernel_size, int dilation, "
      "float scale, bool zero_border) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
  m.def(
      "flow_guided_window_attention(Tensor query, Tensor key, Tensor value, Tensor flow, int window_size, "
      "int num_heads, Tensor? key_bias, Tensor? value_bias, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "flow_guided_window_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
      "Tensor flow, Tensor lse, int window_size, int num_heads, Tensor? key_bias, Tensor? value_bias, "
      "float scale) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_key_bias, "
      "Tensor grad_value_bias)");
  m.def(
      "trajectory_attention(Tensor query, Tensor key, Tensor[] values, Tensor location) "
      "-> (Tensor[] outs, Tensor score, Tensor index)");
  m.def(
      "trajectory_attention_backward(Tensor[] grad_outs, Tensor grad_score, Tensor query, Tensor key, "
      "Tensor[] values, Tensor location, Tensor index) -> (Tensor grad_query, Tensor grad_key, "
      "Tensor[] grad_values)");
  m.def(
      "deform_conv2d(Tensor input, Tensor offset, Tensor weight, Tensor? mask, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "deform_conv2d_backward(Tensor grad_out, Tensor input, Tensor offset, Tensor weight, Tensor? mask, "
      "Tensor? bias, int[2] stride, int[2] padding, int[2] dilation) -> (Tensor grad_input, Tensor grad_offset, "
      "Tensor grad_weight, Tensor grad_mask, Tensor grad_bias)");
  m.def(
      "deform_kernel_conv2d(Tensor input, Tensor weight, Tensor kernel_offset, Tensor? offset, Tensor? mask, "
      "Tensor? bias, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "deform_kernel_conv2d_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor kernel_offset, "
      "Tensor? offset, Tensor? mask, Tensor? bias, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_kernel_offset, Tensor grad_offset, "
      "Tensor grad_mask, Tensor grad_bias)");
}

// The extension's Python module: one build, one cache, every CPU kernel of tokenpool.
// Kernel files include only ATen; pybind's heavy headers are compiled here alone.
#include <torch/csrc/utils/pybind.h>  // not torch/extension.h: halves the compile time

#include <optional>

// paged_attention.cpp
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                  std::optional<int64_t> window);
// layer_kernels.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);
void rotary(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& gate_up);
// bf16_linear.cpp
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
// logits.cpp
void refine_logits(at::Tensor& logits, const at::Tensor& hidden, const at::Tensor& weight);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "Fused paged decode attention (CPU)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("scale"), py::arg("window") = py::none());
  m.def("rms_norm", &rms_norm, "RMSNorm of rows", py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("add_rms_norm", &add_rms_norm, "residual += x, then RMSNorm of residual", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("rotary", &rotary, "RoPE on q and k in place", py::arg("q"), py::arg("k"), py::arg("cos"),
        py::arg("sin"));
  m.def("silu_mul", &silu_mul, "silu(gate) * up", py::arg("gate_up"));
  m.def("bf16_linear", &bf16_linear, "x [M, K] float32 @ bf16 weight [N, K].T + bias, in float32",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
  m.def("refine_logits", &refine_logits, "float32 dot products for each row's near-maximum logits",
        py::arg("logits"), py::arg("hidden"), py::arg("weight"));
}

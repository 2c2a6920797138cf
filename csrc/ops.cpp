// Schemas of every qadapter op. Kernels live in one file per op (CPU here in C++,
// CUDA in qadapter_kernels/ops/*.py as Triton kernels registered through torch.library).
// The Python module around them is module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(qadapter, m) {
  // One pass over the vocabulary per row of [N, V] logits: the soft value
  // V = alpha_tilde * LSE((Q + alpha_0 * L) / alpha_tilde) - alpha_0 * LSE(L), the picked
  // Q[a], and LSE(y) (what the backward needs to rebuild softmax(y) without storing it).
  m.def(
      "residual_q_values(Tensor q_logits, Tensor base_logits, Tensor actions, float alpha_tilde, "
      "float alpha_0) -> (Tensor values, Tensor q_taken, Tensor lse_y)");
  // dQ = grad_q_taken * onehot(actions) + grad_values * softmax(y), written straight into
  // a fresh [N, V] tensor of q_logits' dtype.
  m.def(
      "residual_q_values_backward(Tensor grad_values, Tensor grad_q_taken, Tensor q_logits, "
      "Tensor base_logits, Tensor actions, Tensor lse_y, float alpha_tilde, float alpha_0) -> Tensor");
  // The pair pass over [2B, T]: rewards of the chosen variant, sequence scores,
  // softplus Bradley-Terry, squared-reward regulariser. length_norm: "response" (divide a
  // sequence's score by its number of scored actions), "padded" (by T - 1) or "none". rewards (0 where unscored) and
  // num_scored are kept for the backward.
  m.def(
      "pair_loss(Tensor values, Tensor q_taken, Tensor loss_mask, float gamma, float beta, "
      "str variant, str length_norm) -> (Tensor loss, Tensor pref_loss, Tensor reg_loss, "
      "Tensor scores, Tensor accuracy, Tensor rewards, Tensor num_scored)");
  // Per-token coefficients: d(outputs)/d(values) and d(outputs)/d(q_taken), contracted with
  // the incoming gradients of loss, pref_loss, reg_loss, scores and rewards.
  m.def(
      "pair_loss_backward(Tensor grad_loss, Tensor grad_pref_loss, Tensor grad_reg_loss, "
      "Tensor grad_scores, Tensor grad_rewards, Tensor scores, Tensor rewards, Tensor num_scored, "
      "Tensor loss_mask, float gamma, float beta, str variant, str length_norm) -> "
      "(Tensor grad_values, Tensor grad_q_taken)");
  // The vocabulary pass with the LM head fused in: logits Q = adapter_hidden @ W.T (+ bias) and
  // L = base_hidden @ W.T (+ bias) exist one [tile_rows x tile_vocab] tile at a time. With
  // with_expected, also returns E = softmax(y) @ W ([N, H]; [0, H] otherwise), from which the
  // backward gets grad(adapter_hidden) = grad_q_taken * W[a] + grad_values * E.
  // base_lse: [N] LSE(L) from a cached base pass; then y = W h_c + b' is the only head product
  // per tile (h_c = (adapter_hidden + alpha_0 * base_hidden) / alpha_tilde) and L is never formed.
  m.def(
      "fused_linear_residual_q_values(Tensor adapter_hidden, Tensor base_hidden, Tensor weight, "
      "Tensor? bias, Tensor actions, float alpha_tilde, float alpha_0, int tile_rows, int tile_vocab, "
      "bool with_expected, Tensor? base_lse=None) -> (Tensor values, Tensor q_taken, Tensor lse_y, "
      "Tensor expected)");
  // Gradients of adapter_hidden, weight and bias, each computed only where output_mask says so
  // (an empty tensor otherwise); weight and bias recompute the logits tiles.
  m.def(
      "fused_linear_residual_q_values_backward(Tensor grad_values, Tensor grad_q_taken, "
      "Tensor adapter_hidden, Tensor base_hidden, Tensor weight, Tensor? bias, Tensor actions, "
      "Tensor lse_y, Tensor expected, float alpha_tilde, float alpha_0, int tile_rows, int tile_vocab, "
      "bool[3] output_mask, Tensor? base_lse=None) -> (Tensor grad_adapter_hidden, Tensor grad_weight, "
      "Tensor grad_bias)");
  // Decoding (DESIGN.md §2): the combined policy's logits (Q + alpha_0 * log_softmax(L)) / alpha_tilde.
  m.def("combined_logits(Tensor q_logits, Tensor base_logits, float alpha_tilde, float alpha_0) -> Tensor");
  // One token per row from the combined policy after temperature -> top_k -> top_p -> min_p
  // (Hugging Face's order; temperature 0 is greedy). Per-row parameters are [B] tensors
  // (top_k int64, the rest fp32); uniforms [B] in [0, 1) drive the inverse-CDF draw, so the op
  // is a pure function of its inputs. A row with no finite maximum gives -1.
  m.def(
      "combined_sample(Tensor q_logits, Tensor base_logits, Tensor uniforms, Tensor temperature, "
      "Tensor top_k, Tensor top_p, Tensor min_p, float alpha_tilde, float alpha_0) -> Tensor");
  // The same from final hidden states: one head product per W tile on the combined hidden state
  // h_c = (h_q + alpha_0 * h_b) / alpha_tilde with bias b * (1 + alpha_0) / alpha_tilde (DESIGN.md
  // §2b). two_stream: the adapter and base rows in one product per W tile instead (twice the FLOPs).
  m.def(
      "combined_sample_from_hidden(Tensor adapter_hidden, Tensor base_hidden, Tensor weight, Tensor? bias, "
      "Tensor uniforms, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, float alpha_tilde, "
      "float alpha_0, int tile_vocab, bool two_stream=False) -> Tensor");
  // log pi~(tokens) of the combined policy from hidden states [N, H] (one product on h_c per
  // tile, a running logsumexp per row), in the accumulation dtype; NaN where a token id is
  // outside [0, V). For scoring and log-likelihoods; not differentiable.
  m.def(
      "combined_log_probs_from_hidden(Tensor adapter_hidden, Tensor base_hidden, Tensor weight, Tensor? bias, "
      "Tensor tokens, float alpha_tilde, float alpha_0, int tile_rows, int tile_vocab) -> Tensor");
}

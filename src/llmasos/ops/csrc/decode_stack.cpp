// A decode step's decoder layers in one call (CPU, float32, the Llama family).
//
// A decode step of a small model is ~10 ops a layer, and on 2 cores each op's trip through Python,
// nn.Module and torch's dispatcher (~20 us) costs as much as the op itself: ~300 trips a step for
// SmolLM2. DecodeStack holds every layer's weights and KV cache once, and runs the same kernels the
// Python layers call (gguf_linear.cpp, cpu_ops.cpp), in the same order with the same arguments, so
// its output is bit-identical to the layer-by-layer path (the tests check it); only the trips go.

#include "kernels.h"

#include <tuple>
#include <vector>

namespace {

// A projection: float32 weight [N, K] (qtype < 0) or GGUF blocks of that type, packed (ops/quant.py).
struct Projection {
  torch::Tensor weight;
  int64_t qtype;
  int64_t in_features, out_features;
};

// A projection's LoRA slots (ops/lora.py): per packed shard, A [S, R, K], B transposed [S, R, N], and the
// shard's first column (empty a: no adapters on it).
struct LoraShards {
  std::vector<torch::Tensor> a, b;
  std::vector<int64_t> offsets;
};

struct Layer {
  torch::Tensor input_norm, post_norm, k_cache, v_cache;
  Projection qkv, o, gate_up, down;
  LoraShards lora[4];  // of qkv, o, gate_up, down
};

// y += each row's update through its adapter's slot, every shard of the projection in one call
void add_lora(torch::Tensor& y, const torch::Tensor& x, const LoraShards& shards, const LoraRows* rows) {
  if (rows != nullptr && !shards.a.empty()) lora_apply(y, x, shards.a, shards.b, shards.offsets, *rows);
}

}  // namespace

class DecodeStack {
 public:
  // layers: per layer [input_norm, qkv, o, post_norm, gate_up, down, k_cache, v_cache];
  // qtypes: per layer the four projections' GGUF types (-1: float32 weight).
  DecodeStack(std::vector<std::vector<torch::Tensor>> layers, std::vector<std::vector<int64_t>> qtypes,
              torch::Tensor final_norm, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
              int64_t intermediate_size, double eps, double scale, int64_t max_kernel_rows, int64_t activation_bits)
      : final_norm_(final_norm), num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim),
        eps_(eps), scale_(scale), max_kernel_rows_(max_kernel_rows),
        activation_bits_(activation_bits) {
    TORCH_CHECK(layers.size() == qtypes.size(), "one qtype list per layer");
    const int64_t hidden = final_norm.numel(), q_size = num_heads * head_dim, inter = intermediate_size;
    const int64_t qkv_size = q_size + 2 * num_kv_heads * head_dim;
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& t = layers[i];
      const auto& q = qtypes[i];
      TORCH_CHECK(t.size() == 8 && q.size() == 4, "layer ", i, ": 8 tensors and 4 qtypes");
      layers_.push_back(Layer{t[0], t[3], t[6], t[7], {t[1], q[0], hidden, qkv_size},
                              {t[2], q[1], q_size, hidden}, {t[4], q[2], hidden, 2 * inter}, {t[5], q[3], inter, hidden}});
    }
  }

  // The LoRA slots of every layer's four projections (ops/lora.py kernel_shards: the shards' A's, B's and
  // first columns), applied where forward gets slot indices.
  using Shards = std::tuple<std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<int64_t>>;
  void set_lora(std::vector<std::vector<Shards>> lora) {
    TORCH_CHECK(lora.size() == layers_.size(), "LoRA slots for every layer");
    for (size_t i = 0; i < lora.size(); ++i) {
      TORCH_CHECK(lora[i].size() == 4, "layer ", i, ": LoRA slots of 4 projections");
      for (int p = 0; p < 4; ++p) {
        auto& [a, b, offsets] = lora[i][p];
        TORCH_CHECK(a.size() == b.size() && a.size() == offsets.size(), "layer ", i, ": one A, B and offset per shard");
        if (!a.empty()) slots_ = a[0].size(0);
        layers_[i].lora[p] = LoraShards{a, b, offsets};
      }
    }
  }

  // x: [B, hidden] embeddings of the B decode tokens; cos/sin [B, 1, D]; slots [B] where their K/V go;
  // rows [B] (0..B-1), kv_slots [B, L] and mask [B, 1, 1, L] as the runner builds them; lora_slots [B]:
  // each row's adapter slot (-1: none), or none without adapters. -> [B, hidden].
  torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor slots,
                        torch::Tensor rows, torch::Tensor kv_slots, c10::optional<torch::Tensor> mask,
                        c10::optional<torch::Tensor> lora_slots) {
    const int64_t batch = x.size(0), q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
    torch::Tensor residual;
    // the rows of each adapter slot, grouped once for every projection of the step
    LoraRows groups;
    if (lora_slots.has_value()) groups = lora_rows(*lora_slots, slots_);
    const LoraRows* lora = lora_slots.has_value() ? &groups : nullptr;
    for (const Layer& layer : layers_) {
      torch::Tensor h;
      if (!residual.defined()) {
        residual = x;
        h = rms_norm(x, layer.input_norm, eps_, c10::nullopt);
      } else {
        h = rms_norm(x, layer.input_norm, eps_, residual);  // residual += x
      }
      torch::Tensor qkv = linear(h, layer.qkv);
      add_lora(qkv, h, layer.lora[0], lora);
      const torch::Tensor qk = qkv.narrow(1, 0, q_size + kv_size).view({batch, num_heads_ + num_kv_heads_, head_dim_});
      const torch::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({batch, num_kv_heads_, head_dim_});
      rotary_(qk, cos, sin);
      const torch::Tensor q = qk.narrow(1, 0, num_heads_), k = qk.narrow(1, num_heads_, num_kv_heads_);
      store_kv(k, v, layer.k_cache, layer.v_cache, slots);
      torch::Tensor attn = torch::empty(q.sizes(), q.options());
      decode_attention(q, layer.k_cache, layer.v_cache, rows, kv_slots, mask, scale_, attn);
      const torch::Tensor attn_flat = attn.view({batch, q_size});
      torch::Tensor o = linear(attn_flat, layer.o);
      add_lora(o, attn_flat, layer.lora[1], lora);
      h = rms_norm(o, layer.post_norm, eps_, residual);
      torch::Tensor gate_up = linear(h, layer.gate_up);
      add_lora(gate_up, h, layer.lora[2], lora);
      const torch::Tensor act = silu_and_mul(gate_up);
      x = linear(act, layer.down);
      add_lora(x, act, layer.lora[3], lora);
    }
    return rms_norm(x, final_norm_, eps_, residual);
  }

 private:
  // As ops/quant.py gguf_linear: the kernel up to max_kernel_rows rows, BLAS on dequantized rows above
  torch::Tensor linear(const torch::Tensor& x, const Projection& p) const {
    if (p.qtype < 0) return at::linear(x, p.weight);
    if (x.size(0) > max_kernel_rows_)
      return at::linear(x, gguf_dequantize(p.weight, p.qtype, p.in_features, p.out_features));
    return gguf_linear(x, p.weight, p.qtype, p.in_features, p.out_features, activation_bits_);
  }

  std::vector<Layer> layers_;
  torch::Tensor final_norm_;
  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
  int64_t max_kernel_rows_, activation_bits_;
  int64_t slots_ = 0;  // LoRA slots per projection (set_lora)
};

void register_decode_stack(pybind11::module& m) {
  // module_local: each instruction-set build of this extension registers its own type
  pybind11::class_<DecodeStack>(m, "DecodeStack", pybind11::module_local())
      .def(pybind11::init<std::vector<std::vector<torch::Tensor>>, std::vector<std::vector<int64_t>>, torch::Tensor,
                          int64_t, int64_t, int64_t, int64_t, double, double, int64_t, int64_t>())
      .def("set_lora", &DecodeStack::set_lora)
      .def("forward", &DecodeStack::forward);
}

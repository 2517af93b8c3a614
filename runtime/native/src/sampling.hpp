// The guided DDIM / DDPM loop: runtime/sampling.py function for function, float32 arithmetic
// with float64 tables cast where they are used (as the original's _extract_into_tensor).
#pragma once

#include <functional>

#include "common.hpp"

namespace gdx {

// model_fn(x, t, out): out (B, C or 2C, H, W). grad_fn(x, t, out): (B, C, H, W), the guidance
// scale applied. noise_fn(k, out): (B, C, H, W) standard normal for loop iteration k.
using ModelFn = std::function<void(const std::vector<float>&, const std::vector<int64_t>&, std::vector<float>&)>;
using NoiseFn = std::function<void(int, std::vector<float>&)>;
using StepFn = std::function<void(int k, const std::vector<float>& x)>;

struct StageShape {
  int batch, channels, height, width;
  size_t size() const { return size_t(batch) * channels * height * width; }
};

// Returns x_0 in `x` (x_T on entry). sampler "ddim" (eta) or "ddpm"; grad_fn may be empty.
void sample_loop(const std::string& sampler, const ModelFn& model_fn, const ModelFn& grad_fn,
                 std::vector<float>& x, const StageShape& shape, const Schedule& schedule,
                 bool learn_sigma, float eta, const NoiseFn& noise_fn, const StepFn& on_step);

}  // namespace gdx

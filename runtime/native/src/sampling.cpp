#include "sampling.hpp"

#include <algorithm>
#include <cmath>

namespace gdx {
namespace {

void check_finite(const char* what, const std::vector<float>& v, int k, int i, int64_t t) {
  size_t nan = 0, inf = 0;
  for (float f : v) {
    nan += std::isnan(f);
    inf += std::isinf(f);
  }
  if (nan || inf)
    fail(GDX_ERR_NONFINITE, std::string(what) + " has non-finite values at sampling step " +
                                std::to_string(k) + " (respaced index " + std::to_string(i) +
                                ", timestep " + std::to_string(t) + "): " + std::to_string(nan) +
                                " NaN and " + std::to_string(inf) + " inf out of " +
                                std::to_string(v.size()));
}

// p_mean_variance's outputs (Ho et al. 2020 eqs. 7, 11; Nichol & Dhariwal 2021 eq. 15).
struct Moments {
  std::vector<float> mean, pred_xstart, log_variance, variance;  // per element, or size 1
};

void p_mean_variance(const std::vector<float>& out, const std::vector<float>& x, int i,
                     const Schedule& s, bool learn_sigma, const StageShape& sh, Moments& m) {
  const size_t n = x.size(), plane = size_t(sh.channels) * sh.height * sh.width;
  const size_t expected = learn_sigma ? 2 * n : n;
  if (out.size() != expected)
    fail(GDX_ERR_ENGINE, "model output has " + std::to_string(out.size()) + " values, expected " +
                             std::to_string(expected) + " for x of " + std::to_string(n) +
                             " with learn_sigma=" + (learn_sigma ? "True" : "False"));
  const float sr = static_cast<float>(s.sqrt_recip_alphas_cumprod[i]);
  const float srm1 = static_cast<float>(s.sqrt_recipm1_alphas_cumprod[i]);
  const float c1 = static_cast<float>(s.posterior_mean_coef1[i]);
  const float c2 = static_cast<float>(s.posterior_mean_coef2[i]);
  m.pred_xstart.resize(n);
  m.mean.resize(n);
  if (learn_sigma) {
    const float min_log = static_cast<float>(s.posterior_log_variance_clipped[i]);
    const float max_log = static_cast<float>(std::log(s.betas[i]));
    m.log_variance.resize(n);
    m.variance.resize(n);
    for (int b = 0; b < sh.batch; ++b)
      for (size_t q = 0; q < plane; ++q) {
        const float v = out[b * 2 * plane + plane + q];
        const float frac = (v + 1.0f) / 2.0f;
        const float lv = frac * max_log + (1.0f - frac) * min_log;
        m.log_variance[b * plane + q] = lv;
        m.variance[b * plane + q] = std::exp(lv);
      }
  } else {
    const double var64 = i == 0 ? s.posterior_variance[1] : s.betas[i];  // FIXED_LARGE
    m.variance.assign(1, static_cast<float>(var64));
    m.log_variance.assign(1, static_cast<float>(std::log(var64)));
  }
  for (int b = 0; b < sh.batch; ++b)
    for (size_t q = 0; q < plane; ++q) {
      const size_t e = b * plane + q;
      const float eps = learn_sigma ? out[b * 2 * plane + q] : out[e];
      float px = sr * x[e] - srm1 * eps;
      px = std::min(1.0f, std::max(-1.0f, px));  // clip_denoised
      m.pred_xstart[e] = px;
      m.mean[e] = c1 * px + c2 * x[e];
    }
}

// Algorithm 1 (DDPM guidance): mean += Sigma * g.
void condition_mean(Moments& m, const std::vector<float>& grad) {
  const bool per = m.variance.size() > 1;
  for (size_t e = 0; e < m.mean.size(); ++e) m.mean[e] = m.mean[e] + m.variance[per ? e : 0] * grad[e];
}

// Algorithm 2 (DDIM guidance): eps' = eps - sqrt(1 - alpha_bar) g, eps from the clipped x_0;
// the guided x_0 is not clipped again.
void condition_score(Moments& m, const std::vector<float>& x, int i, const Schedule& s,
                     const std::vector<float>& grad) {
  const float ab = static_cast<float>(s.alphas_cumprod[i]);
  const float sr = static_cast<float>(s.sqrt_recip_alphas_cumprod[i]);
  const float srm1 = static_cast<float>(s.sqrt_recipm1_alphas_cumprod[i]);
  const float c1 = static_cast<float>(s.posterior_mean_coef1[i]);
  const float c2 = static_cast<float>(s.posterior_mean_coef2[i]);
  const float k = std::sqrt(1.0f - ab);
  for (size_t e = 0; e < x.size(); ++e) {
    float eps = (sr * x[e] - m.pred_xstart[e]) / srm1;
    eps = eps - k * grad[e];
    const float px = sr * x[e] - srm1 * eps;
    m.pred_xstart[e] = px;
    m.mean[e] = c1 * px + c2 * x[e];
  }
}

}  // namespace

void sample_loop(const std::string& sampler, const ModelFn& model_fn, const ModelFn& grad_fn,
                 std::vector<float>& x, const StageShape& shape, const Schedule& schedule,
                 bool learn_sigma, float eta, const NoiseFn& noise_fn, const StepFn& on_step) {
  const int K = schedule.size();
  const bool ddim = sampler == "ddim";
  const bool needs_noise = !ddim || eta > 0;
  std::vector<int64_t> t(shape.batch);
  std::vector<float> out, grad, z, sample(x.size());
  Moments m;
  for (int k = 0; k < K; ++k) {
    const int i = K - 1 - k;
    const int64_t t_int = schedule.timestep_map[i];
    std::fill(t.begin(), t.end(), t_int);
    if (on_step) on_step(k, x);
    model_fn(x, t, out);
    check_finite("model output", out, k, i, t_int);
    p_mean_variance(out, x, i, schedule, learn_sigma, shape, m);
    if (needs_noise) noise_fn(k, z);
    if (grad_fn) {
      grad_fn(x, t, grad);
      check_finite("classifier gradient", grad, k, i, t_int);
      if (grad.size() != x.size())
        fail(GDX_ERR_ENGINE, "classifier gradient has " + std::to_string(grad.size()) +
                                 " values, expected " + std::to_string(x.size()) + " like x");
      if (ddim) condition_score(m, x, i, schedule, grad);
      else condition_mean(m, grad);
    }
    if (ddim) {
      // Song et al. 2021, eqs. 12 and 16, eps re-derived from the (guided) x_0.
      const float ab = static_cast<float>(schedule.alphas_cumprod[i]);
      const float abp = static_cast<float>(schedule.alphas_cumprod_prev[i]);
      const float sr = static_cast<float>(schedule.sqrt_recip_alphas_cumprod[i]);
      const float srm1 = static_cast<float>(schedule.sqrt_recipm1_alphas_cumprod[i]);
      const float sigma = eta * std::sqrt((1.0f - abp) / (1.0f - ab)) * std::sqrt(1.0f - ab / abp);
      const float sq_abp = std::sqrt(abp);
      const float dir = std::sqrt(1.0f - abp - sigma * sigma);
      const bool noisy = !(i == 0 || sigma == 0);
      for (size_t e = 0; e < x.size(); ++e) {
        const float eps = (sr * x[e] - m.pred_xstart[e]) / srm1;
        float v = m.pred_xstart[e] * sq_abp + dir * eps;
        if (noisy) v = v + sigma * z[e];
        sample[e] = v;
      }
    } else {
      const bool per = m.log_variance.size() > 1;
      for (size_t e = 0; e < x.size(); ++e) {
        float v = m.mean[e];
        if (i != 0) v = v + std::exp(0.5f * m.log_variance[per ? e : 0]) * z[e];
        sample[e] = v;
      }
    }
    check_finite("sample", sample, k, i, t_int);
    x.swap(sample);
  }
}

}  // namespace gdx

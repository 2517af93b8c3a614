// Noise schedules and respacing in float64: runtime/schedule.py function for function.
#include <cmath>
#include <set>
#include <stdexcept>

#include "common.hpp"

namespace gdx {
namespace {

using Invalid = std::invalid_argument;

std::vector<double> betas_for(const std::string& name, int T) {
  if (T < 1) throw Invalid("num_diffusion_timesteps must be >= 1, got " + std::to_string(T));
  std::vector<double> b(T);
  if (name == "linear") {
    // np.linspace(start, stop, T): i * step + start, the last one exactly stop.
    double scale = 1000.0 / T, start = scale * 0.0001, stop = scale * 0.02;
    double step = T > 1 ? (stop - start) / (T - 1) : 0.0;
    for (int i = 0; i < T; ++i) b[i] = i * step + start;
    if (T > 1) b[T - 1] = stop;
    return b;
  }
  if (name == "cosine") {  // Nichol & Dhariwal 2021, eq. 17
    auto alpha_bar = [](double t) {
      double c = std::cos((t + 0.008) / 1.008 * M_PI / 2);
      return c * c;
    };
    for (int i = 0; i < T; ++i) {
      double t1 = static_cast<double>(i) / T, t2 = static_cast<double>(i + 1) / T;
      b[i] = std::min(1 - alpha_bar(t2) / alpha_bar(t1), 0.999);
    }
    return b;
  }
  throw Invalid("unknown noise schedule '" + name + "': valid ones are 'linear', 'cosine'");
}

bool parse_int(const std::string& s, long long& out) {
  // Python's int(): optional surrounding whitespace and sign, digits, underscores between digits.
  size_t a = 0, b = s.size();
  while (a < b && isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  std::string t;
  for (size_t k = a; k < b; ++k) {
    char c = s[k];
    if (c == '_' && k > a && k + 1 < b && isdigit(static_cast<unsigned char>(s[k - 1])) &&
        isdigit(static_cast<unsigned char>(s[k + 1])))
      continue;
    t += c;
  }
  if (t.empty()) return false;
  size_t k = (t[0] == '+' || t[0] == '-') ? 1 : 0;
  if (k == t.size() || t.size() > 18) return false;
  for (size_t q = k; q < t.size(); ++q)
    if (!isdigit(static_cast<unsigned char>(t[q]))) return false;
  out = std::stoll(t);
  return true;
}

std::set<int> space_timesteps(int T, const std::string& spec_in) {
  std::string spec = spec_in;
  bool blank = true;
  for (char c : spec)
    if (!isspace(static_cast<unsigned char>(c))) blank = false;
  std::set<int> out;
  if (blank) {
    for (int i = 0; i < T; ++i) out.insert(i);
    return out;
  }
  if (spec.rfind("ddim", 0) == 0) {
    long long n;
    if (!parse_int(spec.substr(4), n))
      throw Invalid("invalid timestep respacing '" + spec + "': expected 'ddimN', e.g. 'ddim25'");
    if (!(2 <= n && n <= T))
      throw Invalid("invalid timestep respacing '" + spec + "': 'ddimN' needs 2 <= N <= " +
                    std::to_string(T) + " (the model's diffusion steps), e.g. 'ddim25'");
    for (int stride = 1; stride < T; ++stride) {
      if ((T + stride - 1) / stride == n) {
        for (int i = 0; i < T; i += stride) out.insert(i);
        return out;
      }
    }
    throw Invalid("cannot create exactly " + std::to_string(n) + " steps out of " +
                  std::to_string(T) + " with an integer stride (respacing '" + spec +
                  "'); use a plain count such as '" + std::to_string(n) +
                  "' for evenly spread non-integer strides");
  }
  std::vector<long long> counts;
  size_t start = 0;
  while (true) {
    size_t comma = spec.find(',', start);
    std::string part = spec.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    long long v;
    if (!parse_int(part, v))
      throw Invalid("invalid timestep respacing '" + spec +
                    "': expected 'ddimN' (e.g. 'ddim25'), a step count (e.g. '250'), "
                    "comma-separated section counts (e.g. '10,5,3'), or '' for all steps");
    counts.push_back(v);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  std::string listed = "[";
  for (size_t k = 0; k < counts.size(); ++k) listed += (k ? ", " : "") + std::to_string(counts[k]);
  listed += "]";
  for (long long c : counts)
    if (c < 0) throw Invalid("section counts must be >= 0, got " + listed);
  int sections = static_cast<int>(counts.size());
  int size_per = T / sections, extra = T % sections, start_idx = 0;
  for (int i = 0; i < sections; ++i) {
    int size = size_per + (i < extra ? 1 : 0);
    if (size < counts[i])
      throw Invalid("cannot divide section " + std::to_string(i) + " of " + std::to_string(size) +
                    " steps into " + std::to_string(counts[i]) + " (T=" + std::to_string(T) +
                    ", sections " + listed + ")");
    double frac = counts[i] <= 1 ? 1.0 : static_cast<double>(size - 1) / (counts[i] - 1);
    double cur = 0.0;  // accumulated, rounded half to even, as the original
    for (long long k = 0; k < counts[i]; ++k) {
      out.insert(start_idx + static_cast<int>(std::nearbyint(cur)));
      cur += frac;
    }
    start_idx += size;
  }
  return out;
}

}  // namespace

Schedule Schedule::from_betas(const std::vector<double>& betas, const std::vector<int64_t>& tmap) {
  const size_t n = betas.size();
  if (n < 2)
    throw Invalid("a schedule needs at least 2 steps, got " + std::to_string(n) +
                  " (the original's posterior_log_variance_clipped reads posterior_variance[1])");
  for (size_t k = 0; k < n; ++k)
    if (!(betas[k] > 0 && betas[k] <= 1))
      throw Invalid("betas must lie in (0, 1]; index " + std::to_string(k) + " is " +
                    std::to_string(betas[k]));
  Schedule s;
  s.betas = betas;
  s.timestep_map = tmap;
  s.alphas_cumprod.resize(n);
  double acc = 1.0;
  for (size_t k = 0; k < n; ++k) s.alphas_cumprod[k] = acc = acc * (1.0 - betas[k]);
  s.alphas_cumprod_prev.resize(n);
  s.alphas_cumprod_prev[0] = 1.0;
  for (size_t k = 1; k < n; ++k) s.alphas_cumprod_prev[k] = s.alphas_cumprod[k - 1];
  s.sqrt_recip_alphas_cumprod.resize(n);
  s.sqrt_recipm1_alphas_cumprod.resize(n);
  s.posterior_variance.resize(n);
  s.posterior_log_variance_clipped.resize(n);
  s.posterior_mean_coef1.resize(n);
  s.posterior_mean_coef2.resize(n);
  for (size_t k = 0; k < n; ++k) {
    const double ac = s.alphas_cumprod[k], acp = s.alphas_cumprod_prev[k], b = betas[k];
    s.sqrt_recip_alphas_cumprod[k] = std::sqrt(1.0 / ac);
    s.sqrt_recipm1_alphas_cumprod[k] = std::sqrt(1.0 / ac - 1);
    s.posterior_variance[k] = b * (1.0 - acp) / (1.0 - ac);  // Ho et al. 2020, eq. 7
    s.posterior_mean_coef1[k] = b * std::sqrt(acp) / (1.0 - ac);
    s.posterior_mean_coef2[k] = (1.0 - acp) * std::sqrt(1.0 - b) / (1.0 - ac);
  }
  // posterior_variance[0] is 0; the log is clipped by repeating entry 1.
  for (size_t k = 0; k < n; ++k)
    s.posterior_log_variance_clipped[k] = std::log(s.posterior_variance[k == 0 ? 1 : k]);
  return s;
}

Schedule make_schedule(const std::string& noise_schedule, int T, const std::string& respacing) {
  std::vector<double> base = betas_for(noise_schedule, T);
  std::set<int> use = space_timesteps(T, respacing);
  std::vector<double> betas;
  std::vector<int64_t> tmap;
  double acc = 1.0, last = 1.0;
  for (int i = 0; i < T; ++i) {
    acc *= 1.0 - base[i];
    if (use.count(i)) {
      betas.push_back(1 - acc / last);
      last = acc;
      tmap.push_back(i);
    }
  }
  return Schedule::from_betas(betas, tmap);
}

Schedule truncate(const Schedule& s, int64_t max_t) {
  int keep = 0;
  for (int64_t t : s.timestep_map) keep += t <= max_t;
  if (keep < 2) {
    std::string first = "[";
    for (int k = 0; k < std::min(8, s.size()); ++k)
      first += (k ? ", " : "") + std::to_string(s.timestep_map[k]);
    throw Invalid("start timestep " + std::to_string(max_t) + " keeps " + std::to_string(keep) +
                  " of the respaced steps " + first + "]...: raise it or use more steps");
  }
  return Schedule::from_betas(std::vector<double>(s.betas.begin(), s.betas.begin() + keep),
                              std::vector<int64_t>(s.timestep_map.begin(), s.timestep_map.begin() + keep));
}

}  // namespace gdx

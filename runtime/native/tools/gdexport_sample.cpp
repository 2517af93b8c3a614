// gdexport-sample: guided sampling from a build folder, the native `python -m runtime.sample`.
//
//   gdexport-sample --engine build/ --classes 1,2,3 --scale 4 --steps ddim25 --out samples/
//
// Writes samples.npz (arr_0 uint8 NHWC, arr_1 int64 labels: the layout the guided-diffusion
// evaluator reads) and grid.png (base_grid.png too in a cascade). Exit status 2 on bad input.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "gdexport.h"

namespace fs = std::filesystem;

namespace {

const char* kUsage =
    "usage: gdexport-sample --engine DIR [options]\n"
    "  --engine DIR          the build folder (or an engine file inside it)\n"
    "  --classes 1,2,3       one class id per sample     --class N   one class for every sample\n"
    "  --num-samples N       number of samples (default: 16, or one per --classes)\n"
    "  --scale S             guidance scale >= 0 (default: the manifest's)\n"
    "  --steps SPEC          respacing: 25, ddim25, 250, '10,5,3' (default: the manifest's)\n"
    "  --sampler ddim|ddpm   (default ddim)           --eta E   DDIM eta in [0, 1] (default 0)\n"
    "  --seed N              a non-negative integer (default 0)\n"
    "  --batch N             samples per engine call (default: as many as fit)\n"
    "  --upsampler-start-t T (default: the manifest's; 0 = the whole chain)\n"
    "  --no-upsampler        stop after the base stage  --no-classifier   sample unguided\n"
    "  --backend openvino|tensorrt (default openvino)   --device CPU   --threads N\n"
    "  --out DIR             output folder (default samples)\n";

struct Usage {
  std::string message;
};

// -- checksums and containers ------------------------------------------------------------------
uint32_t crc32(const uint8_t* p, size_t n, uint32_t crc = 0) {
  static uint32_t table[256];
  static bool ready = false;
  if (!ready) {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      table[i] = c;
    }
    ready = true;
  }
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

void put16(std::string& s, uint32_t v) {
  s += char(v & 0xff);
  s += char((v >> 8) & 0xff);
}
void put32(std::string& s, uint32_t v) {
  put16(s, v & 0xffff);
  put16(s, v >> 16);
}
void put32be(std::string& s, uint32_t v) {
  for (int k = 3; k >= 0; --k) s += char((v >> (8 * k)) & 0xff);
}

std::string npy(const std::string& descr, const std::vector<size_t>& shape, const void* data, size_t bytes) {
  std::string dims;
  for (size_t d : shape) dims += std::to_string(d) + ",";
  if (shape.size() > 1) dims.pop_back();
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  while ((10 + header.size() + 1) % 64) header += ' ';
  header += '\n';
  std::string out("\x93NUMPY\x01\x00", 8);
  put16(out, static_cast<uint32_t>(header.size()));
  out += header;
  out.append(static_cast<const char*>(data), bytes);
  return out;
}

// A zip archive of stored (uncompressed) members, as np.savez(..., compress=False) writes.
std::string zip_stored(const std::vector<std::pair<std::string, std::string>>& members) {
  std::string out, central;
  for (const auto& m : members) {
    const uint32_t crc = crc32(reinterpret_cast<const uint8_t*>(m.second.data()), m.second.size());
    const uint32_t offset = static_cast<uint32_t>(out.size());
    auto fields = [&](std::string& s) {
      put16(s, 20);  // version needed
      put16(s, 0);   // flags
      put16(s, 0);   // stored
      put16(s, 0);   // time
      put16(s, 0x21);  // date 1980-01-01
      put32(s, crc);
      put32(s, static_cast<uint32_t>(m.second.size()));
      put32(s, static_cast<uint32_t>(m.second.size()));
      put16(s, static_cast<uint32_t>(m.first.size()));
      put16(s, 0);  // extra
    };
    put32(out, 0x04034b50);
    fields(out);
    out += m.first;
    out += m.second;
    put32(central, 0x02014b50);
    put16(central, 20);  // made by
    fields(central);
    put16(central, 0);  // comment
    put16(central, 0);  // disk
    put16(central, 0);  // internal attributes
    put32(central, 0);  // external attributes
    put32(central, offset);
    central += m.first;
  }
  const uint32_t cd_offset = static_cast<uint32_t>(out.size());
  out += central;
  put32(out, 0x06054b50);
  put16(out, 0);
  put16(out, 0);
  put16(out, static_cast<uint32_t>(members.size()));
  put16(out, static_cast<uint32_t>(members.size()));
  put32(out, static_cast<uint32_t>(central.size()));
  put32(out, cd_offset);
  put16(out, 0);
  return out;
}

// (H, W, 3) uint8 -> PNG, zlib with stored blocks.
std::string png(const uint8_t* rgb, int h, int w) {
  std::string raw;
  for (int r = 0; r < h; ++r) {
    raw += '\0';  // filter: none
    raw.append(reinterpret_cast<const char*>(rgb + size_t(r) * w * 3), size_t(w) * 3);
  }
  std::string z = "\x78\x01";
  uint32_t a = 1, b = 0;
  for (unsigned char c : raw) {
    a = (a + c) % 65521;
    b = (b + a) % 65521;
  }
  for (size_t pos = 0; pos < raw.size() || pos == 0; pos += 65535) {
    const size_t len = std::min<size_t>(65535, raw.size() - pos);
    z += char(pos + len >= raw.size() ? 1 : 0);
    put16(z, static_cast<uint32_t>(len));
    put16(z, static_cast<uint32_t>(~len & 0xffff));
    z.append(raw, pos, len);
    if (pos + len >= raw.size()) break;
  }
  put32be(z, (b << 16) | a);
  auto chunk = [](const std::string& tag, const std::string& data) {
    std::string c;
    put32be(c, static_cast<uint32_t>(data.size()));
    std::string body = tag + data;
    c += body;
    put32be(c, crc32(reinterpret_cast<const uint8_t*>(body.data()), body.size()));
    return c;
  };
  std::string ihdr;
  put32be(ihdr, static_cast<uint32_t>(w));
  put32be(ihdr, static_cast<uint32_t>(h));
  ihdr += std::string("\x08\x02\x00\x00\x00", 5);
  return std::string("\x89PNG\r\n\x1a\n", 8) + chunk("IHDR", ihdr) + chunk("IDAT", z) + chunk("IEND", "");
}

// runtime/images.grid: white padding 2, ceil(sqrt(n)) columns, pixels enlarged to ~128.
std::string grid_png(const std::vector<uint8_t>& images, int n, int s) {
  const int scale = std::max(1, 128 / s), pad = 2, hs = s * scale;
  const int cols = static_cast<int>(std::ceil(std::sqrt(static_cast<double>(n))));
  const int rows = (n + cols - 1) / cols;
  const int H = rows * (hs + pad) + pad, W = cols * (hs + pad) + pad;
  std::vector<uint8_t> out(size_t(H) * W * 3, 255);
  for (int k = 0; k < n; ++k) {
    const int r = k / cols, q = k % cols;
    for (int y = 0; y < hs; ++y)
      for (int x = 0; x < hs; ++x)
        for (int c = 0; c < 3; ++c)
          out[(size_t(pad + r * (hs + pad) + y) * W + pad + q * (hs + pad) + x) * 3 + c] =
              images[((size_t(k) * s + y / scale) * s + x / scale) * 3 + c];
  }
  return png(out.data(), H, W);
}

void write_file(const fs::path& path, const std::string& data) {
  const fs::path tmp = path.parent_path() / ("." + path.filename().string() + ".tmp");
  {
    std::ofstream f(tmp, std::ios::binary);
    f.write(data.data(), static_cast<std::streamsize>(data.size()));
    if (!f) throw std::runtime_error("cannot write " + tmp.string());
  }
  fs::rename(tmp, path);
}

// -- flags -------------------------------------------------------------------------------------
long long to_int(const std::string& flag, const std::string& v) {
  size_t used = 0;
  long long x = 0;
  try {
    x = std::stoll(v, &used);
  } catch (...) {
    used = 0;
  }
  if (used == 0 || used != v.size()) throw Usage{"invalid value for " + flag + ": '" + v + "' is not an integer"};
  return x;
}
double to_num(const std::string& flag, const std::string& v) {
  size_t used = 0;
  double x = 0;
  try {
    x = std::stod(v, &used);
  } catch (...) {
    used = 0;
  }
  if (used == 0 || used != v.size() || !std::isfinite(x))
    throw Usage{"invalid value for " + flag + ": '" + v + "' is not a finite number"};
  return x;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> kw;
  const std::vector<std::string> valued = {"--engine", "--classes", "--class", "--num-samples", "--scale",
                                           "--steps", "--sampler", "--eta", "--seed", "--out", "--batch",
                                           "--upsampler-start-t", "--backend", "--device", "--threads"};
  const std::vector<std::string> flags = {"--no-upsampler", "--no-classifier"};
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      if (a == "-h" || a == "--help") {
        std::cout << kUsage;
        return 0;
      }
      std::string value;
      const size_t eq = a.find('=');
      if (a.rfind("--", 0) == 0 && eq != std::string::npos) {
        value = a.substr(eq + 1);
        a = a.substr(0, eq);
      }
      if (std::find(flags.begin(), flags.end(), a) != flags.end()) {
        kw[a] = "1";
      } else if (std::find(valued.begin(), valued.end(), a) != valued.end()) {
        if (eq == std::string::npos) {
          if (i + 1 >= argc) throw Usage{"option " + a + " requires an argument"};
          value = argv[++i];
        }
        kw[a] = value;
      } else {
        throw Usage{"no such option: " + a};
      }
    }
    if (!kw.count("--engine")) throw Usage{"missing option --engine"};
    if (kw.count("--class") && kw.count("--classes")) throw Usage{"--class and --classes exclude each other: give one"};
    if (kw.count("--sampler") && kw["--sampler"] != "ddim" && kw["--sampler"] != "ddpm")
      throw Usage{"invalid value for --sampler: '" + kw["--sampler"] + "' is not one of 'ddim', 'ddpm'"};
    if (kw.count("--backend") && kw["--backend"] != "openvino" && kw["--backend"] != "tensorrt")
      throw Usage{"invalid value for --backend: '" + kw["--backend"] + "' is not one of 'openvino', 'tensorrt'"};
    std::vector<int64_t> labels;
    if (kw.count("--classes")) {
      std::string s = kw["--classes"];
      size_t start = 0;
      while (true) {
        size_t c = s.find(',', start);
        std::string part = s.substr(start, c == std::string::npos ? std::string::npos : c - start);
        try {
          labels.push_back(to_int("--classes", part));
        } catch (const Usage&) {
          throw Usage{"--classes takes comma-separated integers, got '" + s + "'"};
        }
        if (c == std::string::npos) break;
        start = c + 1;
      }
    }
    long long num = kw.count("--num-samples") ? to_int("--num-samples", kw["--num-samples"])
                                              : (labels.empty() ? 16 : static_cast<long long>(labels.size()));
    if (num < 1) throw Usage{"--num-samples must be a positive integer, got " + std::to_string(num)};
    if (kw.count("--class")) labels.assign(static_cast<size_t>(num), to_int("--class", kw["--class"]));
    if (labels.size() == 1 && num > 1) labels.assign(static_cast<size_t>(num), labels[0]);
    if (!labels.empty() && static_cast<long long>(labels.size()) != num)
      throw Usage{std::to_string(labels.size()) + " labels given for " + std::to_string(num) + " samples"};
    const long long seed = kw.count("--seed") ? to_int("--seed", kw["--seed"]) : 0;
    if (seed < 0) throw Usage{"seed must be >= 0, got " + std::to_string(seed)};
    for (const char* f : {"--batch", "--threads"})
      if (kw.count(f) && to_int(f, kw[f]) < 1) throw Usage{std::string(f) + " must be a positive integer, got " + kw[f]};
    double scale = -1;
    if (kw.count("--scale")) {
      scale = to_num("--scale", kw["--scale"]);
      if (scale < 0)
        throw Usage{"guidance scale must be >= 0 (0 = unguided), got " + kw["--scale"] +
                    ": a negative scale steers samples away from their class"};
      if (scale != 0 && kw.count("--no-classifier")) throw Usage{"--scale with --no-classifier: guidance needs the classifier"};
    }
    const double eta = kw.count("--eta") ? to_num("--eta", kw["--eta"]) : 0.0;
    const int start_t = kw.count("--upsampler-start-t") ? static_cast<int>(to_int("--upsampler-start-t", kw["--upsampler-start-t"])) : -1;
    if (kw.count("--upsampler-start-t") && start_t < 0)
      throw Usage{"upsampler_start_t must be >= 0, got " + std::to_string(start_t)};
    const fs::path out = kw.count("--out") ? kw["--out"] : "samples";

    // Open the build.
    fs::path engine = kw["--engine"];
    std::string unet_file;
    std::error_code ec;
    if (!fs::exists(engine, ec) && !fs::is_regular_file(engine.parent_path() / "manifest.json", ec))
      throw Usage{"--engine " + engine.string() +
                  " does not exist: pass a build folder made by `gdexport build` (or an engine file inside one)"};
    fs::path dir = engine;
    if (!fs::is_directory(engine, ec)) {
      dir = engine.parent_path().empty() ? fs::path(".") : engine.parent_path();
      if (engine.filename() != "manifest.json") unet_file = engine.filename().string();
    }
    gdx_options o;
    std::memset(&o, 0, sizeof o);
    std::string backend = kw.count("--backend") ? kw["--backend"] : "openvino";
    std::string device = kw.count("--device") ? kw["--device"] : "CPU";
    o.engine = backend.c_str();
    o.device = device.c_str();
    o.unet_file = unet_file.empty() ? nullptr : unet_file.c_str();
    o.threads = kw.count("--threads") ? static_cast<int>(to_int("--threads", kw["--threads"])) : 0;
    o.no_classifier = kw.count("--no-classifier") ? 1 : 0;
    o.no_upsampler = kw.count("--no-upsampler") ? 1 : 0;
    const auto t0 = std::chrono::steady_clock::now();
    gdx_runtime* rt = nullptr;
    if (gdx_open(dir.string().c_str(), &o, &rt) != GDX_OK) {
      std::cerr << "error: " << gdx_last_error() << "\n";
      return 2;
    }
    const auto t1 = std::chrono::steady_clock::now();
    gdx_sample_params p = gdx_default_params();
    p.labels = labels.empty() ? nullptr : labels.data();
    p.n = static_cast<int>(num);
    p.scale = scale;
    std::string steps = kw.count("--steps") ? kw["--steps"] : "";
    std::string sampler = kw.count("--sampler") ? kw["--sampler"] : "ddim";
    p.steps = kw.count("--steps") ? steps.c_str() : nullptr;
    p.sampler = sampler.c_str();
    p.eta = eta;
    p.seed = static_cast<uint64_t>(seed);
    p.batch = kw.count("--batch") ? static_cast<int>(to_int("--batch", kw["--batch"])) : 0;
    p.upsampler_start_t = start_t;
    const int s = gdx_image_size(rt), bs = gdx_base_image_size(rt);
    const bool cascade = gdx_has_upsampler(rt) != 0;
    std::vector<uint8_t> images(size_t(num) * s * s * 3), base_u8;
    std::vector<int64_t> out_labels(static_cast<size_t>(num));
    std::vector<float> base;
    if (cascade) base.resize(size_t(num) * 3 * bs * bs);
    const gdx_status st = gdx_sample_ex(rt, &p, images.data(), out_labels.data(), cascade ? base.data() : nullptr, nullptr);
    const auto t2 = std::chrono::steady_clock::now();
    const bool has_labels = gdx_num_classes(rt) >= 0 || !labels.empty();
    gdx_close(rt);
    if (st != GDX_OK) {
      std::cerr << "error: " << gdx_last_error() << "\n";
      return 2;
    }
    // Outputs: everything is made first, then written.
    std::vector<std::pair<std::string, std::string>> members = {
        {"arr_0.npy", npy("|u1", {size_t(num), size_t(s), size_t(s), 3}, images.data(), images.size())}};
    if (has_labels && out_labels[0] >= 0)
      members.push_back({"arr_1.npy", npy("<i8", {size_t(num)}, out_labels.data(), out_labels.size() * 8)});
    std::vector<std::pair<std::string, std::string>> files = {{"samples.npz", zip_stored(members)},
                                                              {"grid.png", grid_png(images, static_cast<int>(num), s)}};
    if (cascade) {
      base_u8.resize(size_t(num) * bs * bs * 3);
      const size_t plane = size_t(bs) * bs;
      for (long long b = 0; b < num; ++b)
        for (size_t q = 0; q < plane; ++q)
          for (int c = 0; c < 3; ++c) {
            float v = (base[(size_t(b) * 3 + c) * plane + q] + 1.0f) * 127.5f;
            base_u8[(size_t(b) * plane + q) * 3 + c] = static_cast<uint8_t>(std::min(255.0f, std::max(0.0f, v)));
          }
      files.push_back({"base_grid.png", grid_png(base_u8, static_cast<int>(num), bs)});
    }
    try {
      fs::create_directories(out);
      for (const auto& f : files) write_file(out / f.first, f.second);
    } catch (const std::exception& e) {
      std::cerr << "error: cannot write to " << out.string() << ": " << e.what() << "\n";
      return 2;
    }
    const double open_s = std::chrono::duration<double>(t1 - t0).count();
    const double sample_s = std::chrono::duration<double>(t2 - t1).count();
    std::printf("wrote %lld samples to %s (samples.npz, grid.png%s)\n", num, out.string().c_str(),
                cascade ? ", base_grid.png" : "");
    std::printf("open %.2f s; %.2f s sampling (%.4f s per sample)\n", open_s, sample_s, sample_s / num);
    return 0;
  } catch (const Usage& u) {
    std::cerr << kUsage << "error: " << u.message << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}

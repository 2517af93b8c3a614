// manifest.json: loaded and validated as runtime/manifest.py does (same checks, same wording).
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common.hpp"

namespace fs = std::filesystem;

namespace gdx {
namespace {

constexpr const char* kName = "manifest.json";
constexpr const char* kFormat = "gdexport-manifest";
constexpr int kVersion = 1;
const std::vector<std::string> kPrecisions = {"fp32", "fp16", "bf16", "int8"};
// runtime/roles.py: role -> component
const std::vector<std::pair<std::string, std::string>> kRoles = {
    {"unet", "unet"}, {"classifier_grad", "classifier"}, {"classifier", "classifier"},
    {"upsampler", "upsampler"}};

[[noreturn]] void bad(const std::string& where, const std::string& key, const std::string& what) {
  fail(GDX_ERR_MANIFEST, where + " is not a valid gdexport manifest: " + key + " " + what +
                             ". The file was edited or written by another tool; rebuild the "
                             "folder with `gdexport build`");
}

enum Kind { kInt = 1, kNum = 2, kStr = 4, kBool = 8, kDict = 16, kList = 32 };

std::string kind_names(int kinds, bool none) {
  std::string s;
  auto add = [&](const char* n) { s += (s.empty() ? "" : "/") + std::string(n); };
  if (kinds & kInt) add("int");
  if (kinds & kNum) add("float");
  if (kinds & kStr) add("str");
  if (kinds & kBool) add("bool");
  if (kinds & kDict) add("dict");
  if (kinds & kList) add("list");
  return s + (none ? " or null" : "");
}

// The value of `key` in `d`, of one of `kinds` (ints count as floats where kNum, as in Python).
const Json* need(const std::string& where, const Json* d, const std::string& key, int kinds,
                 const std::string& path, bool none = false) {
  const Json* v = (d && d->type == Json::Object) ? d->get(key) : nullptr;
  if (!v) bad(where, path + "'" + key + "'", "is missing");
  if (v->type == Json::Null && none) return v;
  bool ok = false;
  switch (v->type) {
    case Json::Number:
      ok = ((kinds & kInt) && v->is_int) || ((kinds & kNum) && std::isfinite(v->num));
      break;
    case Json::String: ok = kinds & kStr; break;
    case Json::Bool: ok = kinds & kBool; break;
    case Json::Object: ok = kinds & kDict; break;
    case Json::Array: ok = kinds & kList; break;
    default: break;
  }
  if (!ok) bad(where, path + "'" + key + "'", "must be " + kind_names(kinds, none) + ", got " + v->repr());
  return v;
}

void validate(const Json& data, const std::string& where) {
  if (data.type != Json::Object)
    fail(GDX_ERR_MANIFEST, where + " is not a gdexport manifest: it holds a JSON value that is "
                                   "not an object; rebuild the folder");
  const Json* format = data.get("format");
  if (!format || format->type != Json::String || format->str != kFormat)
    fail(GDX_ERR_MANIFEST, where + " is not a " + kFormat + " manifest (format=" +
                               (format ? format->repr() : "None") + "); rebuild the folder");
  const Json* version = data.get("version");
  if (version && version->type == Json::Number && version->is_int && version->i > kVersion)
    fail(GDX_ERR_MANIFEST,
         where + " is a version " + std::to_string(version->i) +
             " manifest, written by a newer gdexport; this one reads version " +
             std::to_string(kVersion) +
             ": upgrade gdexport (`pip install -U gdexport`) or rebuild the folder with this version");
  if (!version || version->type != Json::Number || !version->is_int || version->i != kVersion)
    fail(GDX_ERR_MANIFEST, where + " is not a " + kFormat + " version " + std::to_string(kVersion) +
                               " manifest (version=" + (version ? version->repr() : "None") +
                               "); rebuild the folder");
  const Json* comps = need(where, &data, "components", kDict, "");
  if (comps->obj.empty()) bad(where, "'components'", "is empty");
  for (const auto& kv : comps->obj) {
    const std::string& name = kv.first;
    const Json* c = &kv.second;
    std::string p = "components." + name + ".";
    if (name != "unet" && name != "classifier" && name != "upsampler")
      bad(where, "components.'" + name + "'", "is not a component (unet, classifier, upsampler)");
    need(where, c, "image_size", kInt, p);
    need(where, c, "num_classes", kInt, p, true);
    const Json* diff = need(where, c, "diffusion", kDict, p);
    need(where, diff, "noise_schedule", kStr, p + "diffusion.");
    need(where, diff, "diffusion_steps", kInt, p + "diffusion.");
    need(where, diff, "learn_sigma", kBool, p + "diffusion.");
    if (name == "upsampler") need(where, c, "low_res_size", kInt, p);
  }
  const Json* sampling = data.get("sampling");
  if (sampling) {
    if (sampling->type != Json::Object)
      bad(where, "'sampling'", "must be an object, got " + sampling->repr());
    const std::pair<const char*, int> keys[] = {{"scale", kInt | kNum}, {"respacing", kStr},
                                                {"upsampler_respacing", kStr},
                                                {"upsampler_start_t", kInt}, {"grayscale", kBool}};
    for (const auto& k : keys)
      if (sampling->get(k.first)) need(where, sampling, k.first, k.second, "sampling.", true);
    const Json* scale = sampling->get("scale");
    if (scale && scale->type == Json::Number && scale->num < 0)
      bad(where, "sampling.'scale'", "must be >= 0, got " + scale->repr());
  }
  const Json* arts = need(where, &data, "artifacts", kList, "");
  for (size_t i = 0; i < arts->arr.size(); ++i) {
    const Json* a = &arts->arr[i];
    std::string p = "artifacts[" + std::to_string(i) + "].";
    const std::string file = need(where, a, "file", kStr, p)->str;
    p = "artifacts[" + std::to_string(i) + "] (" + file + ").";
    const std::string role = need(where, a, "role", kStr, p)->str;
    std::string component;
    for (const auto& r : kRoles)
      if (r.first == role) component = r.second;
    if (component.empty())
      bad(where, p + "'role'", "must be one of unet, classifier_grad, classifier, upsampler, got '" + role + "'");
    if (!comps->get(component))
      bad(where, p + "'role'", "is '" + role + "', but the manifest has no " + component);
    const std::string prec = need(where, a, "precision", kStr, p)->str;
    bool known = false;
    for (const auto& q : kPrecisions) known |= q == prec;
    if (!known) bad(where, p + "'precision'", "must be one of fp32, fp16, bf16, int8, got '" + prec + "'");
    need(where, a, "backend", kStr, p);
    const std::string sha = need(where, a, "sha256", kStr, p)->str;
    bool hex = sha.size() == 64;
    for (char ch : sha) hex &= (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f');
    if (!hex) bad(where, p + "'sha256'", "must be 64 hex digits, got '" + sha + "'");
    for (const char* key : {"inputs", "outputs"}) {
      const Json* specs = need(where, a, key, kList, p);
      for (size_t j = 0; j < specs->arr.size(); ++j) {
        const Json* t = &specs->arr[j];
        std::string q = p + key + "[" + std::to_string(j) + "].";
        need(where, t, "name", kStr, q);
        need(where, t, "dtype", kStr, q);
        const Json* shape = need(where, t, "shape", kList, q);
        for (const Json& d : shape->arr)
          if (!((d.type == Json::Number && d.is_int) || d.type == Json::String))
            bad(where, q + "'shape'", "must hold ints and names, got " + shape->repr());
      }
    }
    const Json* batch = need(where, a, "batch", kDict, p);
    int64_t b[3];
    const char* names[3] = {"min", "opt", "max"};
    for (int k = 0; k < 3; ++k) b[k] = need(where, batch, names[k], kInt, p + "batch.")->i;
    if (!(1 <= b[0] && b[0] <= b[1] && b[1] <= b[2]))
      bad(where, p + "'batch'", "must satisfy 1 <= min <= opt <= max, got " + batch->repr());
  }
  const Json* parity = data.get("parity");
  if (parity && parity->type != Json::Object)
    bad(where, "'parity'", "must be an object, got " + parity->repr());
}

Component component_of(const Json& comps, const char* name) {
  Component c;
  const Json* j = comps.get(name);
  if (!j) return c;
  c.present = true;
  c.image_size = static_cast<int>(j->get("image_size")->i);
  const Json* nc = j->get("num_classes");
  c.num_classes = nc->type == Json::Null ? -1 : static_cast<int>(nc->i);
  if (const Json* lr = j->get("low_res_size"); lr && lr->type == Json::Number) c.low_res_size = static_cast<int>(lr->i);
  const Json* d = j->get("diffusion");
  c.diffusion.noise_schedule = d->get("noise_schedule")->str;
  c.diffusion.diffusion_steps = static_cast<int>(d->get("diffusion_steps")->i);
  c.diffusion.learn_sigma = d->get("learn_sigma")->b;
  return c;
}

std::vector<TensorSpec> specs_of(const Json& list) {
  std::vector<TensorSpec> out;
  for (const Json& t : list.arr) {
    TensorSpec s;
    s.name = t.get("name")->str;
    s.dtype = t.get("dtype")->str;
    for (const Json& d : t.get("shape")->arr) s.shape.push_back(d.type == Json::String ? -1 : d.i);
    out.push_back(s);
  }
  return out;
}

// folder / file, refused unless it stays inside the folder (runtime/manifest.py: confined).
std::string confined(const std::string& folder, const std::string& file) {
  const std::string where = (fs::path(folder) / kName).string();
  fs::path f(file);
  bool dotdot = false;
  for (const auto& part : f) dotdot |= part == "..";
  if (file.empty() || f.is_absolute() || dotdot)
    fail(GDX_ERR_MANIFEST, where + " names the artefact file '" + file +
                               "', which is not a path inside the build folder; a build only "
                               "refers to its own files: rebuild the folder");
  fs::path path = fs::path(folder) / f;
  std::error_code ec;
  fs::path root = fs::weakly_canonical(fs::path(folder), ec);
  fs::path real = fs::weakly_canonical(path, ec);
  auto r = root.begin(), q = real.begin();
  for (; r != root.end() && q != real.end() && *r == *q; ++r, ++q) {
  }
  if (r != root.end())
    fail(GDX_ERR_MANIFEST, where + ": the artefact '" + file + "' resolves to " + real.string() +
                               ", outside the build folder " + root.string() +
                               " (a symlink out of it?); a build only refers to its own files: "
                               "copy the file in or rebuild the folder");
  return path.string();
}

}  // namespace

Manifest Manifest::load(const std::string& build_dir) {
  fs::path dir(build_dir);
  fs::path file;
  std::error_code ec;
  if (fs::is_directory(dir, ec)) file = dir / kName;
  else if (dir.filename() == kName) file = dir;
  else file = dir.parent_path() / kName;
  if (!fs::is_regular_file(file, ec))
    fail(GDX_ERR_MANIFEST, "no " + std::string(kName) + " in " + file.parent_path().string() +
                               ": it is not a complete gdexport build (an interrupted build "
                               "leaves none). Run `gdexport build -o " +
                               file.parent_path().string() + " ...` again.");
  std::ifstream in(file, std::ios::binary);
  if (!in) fail(GDX_ERR_MANIFEST, "cannot read " + file.string());
  std::stringstream ss;
  ss << in.rdbuf();
  Manifest m;
  m.folder = file.parent_path().string();
  if (m.folder.empty()) m.folder = ".";
  m.file = file.string();
  try {
    m.data = Json::parse(ss.str());
  } catch (const std::runtime_error& e) {
    fail(GDX_ERR_MANIFEST, m.file + " is not valid JSON (" + e.what() + "); rebuild the folder");
  }
  validate(m.data, m.file);
  const Json& comps = *m.data.get("components");
  m.unet = component_of(comps, "unet");
  m.classifier = component_of(comps, "classifier");
  m.upsampler = component_of(comps, "upsampler");
  if (const Json* s = m.data.get("sampling")) {
    if (const Json* v = s->get("scale"); v && v->type == Json::Number) {
      m.has_scale = true;
      m.scale = v->num;
    }
    if (const Json* v = s->get("respacing"); v && v->type == Json::String) m.respacing = v->str;
    if (const Json* v = s->get("upsampler_respacing"); v && v->type == Json::String)
      m.upsampler_respacing = v->str;
    if (const Json* v = s->get("upsampler_start_t"); v && v->type == Json::Number)
      m.upsampler_start_t = static_cast<int>(v->i);
    if (const Json* v = s->get("grayscale"); v && v->type == Json::Bool) m.grayscale = v->b;
  }
  for (const Json& a : m.data.get("artifacts")->arr) {
    Artifact art;
    art.file = a.get("file")->str;
    art.role = a.get("role")->str;
    art.precision = a.get("precision")->str;
    art.backend = a.get("backend")->str;
    art.sha256 = a.get("sha256")->str;
    art.inputs = specs_of(*a.get("inputs"));
    art.outputs = specs_of(*a.get("outputs"));
    const Json* b = a.get("batch");
    art.batch_min = static_cast<int>(b->get("min")->i);
    art.batch_opt = static_cast<int>(b->get("opt")->i);
    art.batch_max = static_cast<int>(b->get("max")->i);
    m.artifacts.push_back(art);
  }
  // Pointers into m.data only once the vector no longer moves.
  const auto& list = m.data.get("artifacts")->arr;
  for (size_t k = 0; k < m.artifacts.size(); ++k) m.artifacts[k].entry = &list[k];
  return m;
}

const Artifact* Manifest::artifact(const std::string& role, const std::string& precision,
                                   const std::string& backend) const {
  for (const auto& a : artifacts)
    if (a.role == role && (precision.empty() || a.precision == precision) &&
        (backend.empty() || a.backend == backend))
      return &a;
  return nullptr;
}

const Artifact* Manifest::nearest(const std::string& role, const std::string& precision,
                                  const std::string& backend) const {
  std::vector<std::string> order = {precision};
  if (precision == "int8") order = {"int8", "fp16", "fp32"};
  else if (precision == "fp16") order = {"fp16", "fp32"};
  else if (precision == "bf16") order = {"bf16", "fp32", "fp16"};
  else if (precision == "fp32") order = {"fp32", "fp16"};
  for (const auto& p : order)
    if (const Artifact* a = artifact(role, p, backend)) return a;
  if (const Artifact* a = artifact(role, "", backend)) return a;
  return artifact(role, "", "");
}

const Artifact& Manifest::artifact_for_file(const std::string& name_in) const {
  std::string name = fs::path(name_in).filename().string();
  for (const auto& a : artifacts)
    if (fs::path(a.file).filename().string() == name) return a;
  std::string listed;
  for (const auto& a : artifacts) listed += (listed.empty() ? "" : ", ") + a.file;
  fail(GDX_ERR_MANIFEST, name + " is not listed in " + (fs::path(folder) / kName).string() +
                             " (it lists: " + (listed.empty() ? "none" : listed) +
                             "); pass an engine from that build or rebuild");
}

std::string Manifest::verify(const Artifact& a) const {
  std::string path = confined(folder, a.file);
  std::error_code ec;
  if (!fs::is_regular_file(path, ec))
    fail(GDX_ERR_MANIFEST, path + " is missing, though " + kName + " lists it; rebuild the folder");
  std::string digest = sha256_file(path);
  if (digest != a.sha256)
    fail(GDX_ERR_MANIFEST, path + " does not match its manifest (sha256 " + digest.substr(0, 12) +
                               "... vs " + a.sha256.substr(0, 12) +
                               "...): the file was changed or corrupted after the build; rebuild "
                               "the folder with the same `gdexport build` command");
  return path;
}

void check_feeds(const Artifact& a, const std::vector<Feed>& feeds) {
  std::string expected = "[";
  for (size_t k = 0; k < a.inputs.size(); ++k) expected += (k ? ", '" : "'") + a.inputs[k].name + "'";
  expected += "]";
  for (const auto& spec : a.inputs) {
    const Feed* f = nullptr;
    for (const auto& x : feeds)
      if (x.name == spec.name) f = &x;
    if (!f) fail(GDX_ERR_ENGINE, "engine inputs are " + expected + "; missing ['" + spec.name + "']");
    if (f->dtype != spec.dtype)
      fail(GDX_ERR_ENGINE, "input '" + spec.name + "' must be " + spec.dtype + ", got " + f->dtype);
    bool ok = f->shape.size() == spec.shape.size();
    for (size_t k = 0; ok && k < spec.shape.size(); ++k) ok = spec.shape[k] < 0 || spec.shape[k] == f->shape[k];
    if (!ok) {
      auto dims = [](const std::vector<int64_t>& d, bool named) {
        std::string r = "(";
        for (size_t k = 0; k < d.size(); ++k)
          r += (k ? ", " : "") + (named && d[k] < 0 ? std::string("'batch'") : std::to_string(d[k]));
        return r + (d.size() == 1 ? ",)" : ")");
      };
      fail(GDX_ERR_ENGINE, "input '" + spec.name + "' must have shape " + dims(spec.shape, true) +
                               ", got " + dims(f->shape, false));
    }
    if (!spec.shape.empty() && spec.shape[0] < 0) {
      int64_t b = f->shape[0];
      if (b < a.batch_min || b > a.batch_max)
        fail(GDX_ERR_ENGINE, "batch " + std::to_string(b) + " is outside the engine's range " +
                                 std::to_string(a.batch_min) + ".." + std::to_string(a.batch_max) +
                                 "; use a batch in range or rebuild with --batch-max " + std::to_string(b));
    }
  }
  for (const auto& f : feeds)
    if (!a.input(f.name))
      fail(GDX_ERR_ENGINE, "engine inputs are " + expected + "; unexpected ['" + f.name + "']");
}

}  // namespace gdx

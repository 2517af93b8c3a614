// A small strict JSON reader: what manifest.json holds, with positions in its errors.
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "common.hpp"

namespace gdx {
namespace {

struct Parser {
  const std::string& s;
  size_t p = 0;

  [[noreturn]] void bad(const std::string& what) {
    size_t line = 1, col = 1;
    for (size_t k = 0; k < p && k < s.size(); ++k) {
      if (s[k] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    throw std::runtime_error(what + ": line " + std::to_string(line) + " column " +
                             std::to_string(col) + " (char " + std::to_string(p) + ")");
  }
  void ws() {
    while (p < s.size() && (s[p] == ' ' || s[p] == '\t' || s[p] == '\n' || s[p] == '\r')) ++p;
  }
  // After a member or element: true at the closing bracket, false after a ',' (go on).
  bool closed(char close) {
    ws();
    if (p < s.size() && s[p] == ',') {
      ++p;
      return false;
    }
    if (p < s.size() && s[p] == close) {
      ++p;
      return true;
    }
    bad("Expecting ',' delimiter");
  }
  bool lit(const char* w) {
    size_t n = std::char_traits<char>::length(w);
    if (s.compare(p, n, w) == 0) {
      p += n;
      return true;
    }
    return false;
  }
  static void utf8(std::string& out, uint32_t c) {
    if (c < 0x80) {
      out += static_cast<char>(c);
    } else if (c < 0x800) {
      out += static_cast<char>(0xC0 | (c >> 6));
      out += static_cast<char>(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
      out += static_cast<char>(0xE0 | (c >> 12));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (c & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (c >> 18));
      out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (c & 0x3F));
    }
  }
  uint32_t hex4() {
    if (p + 4 > s.size()) bad("Invalid \\uXXXX escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = s[p++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else bad("Invalid \\uXXXX escape");
    }
    return v;
  }
  std::string string() {
    ++p;  // opening quote
    std::string out;
    while (true) {
      if (p >= s.size()) bad("Unterminated string starting");
      char c = s[p++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) bad("Invalid control character");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (p >= s.size()) bad("Unterminated string");
      char e = s[p++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t c1 = hex4();
          if (c1 >= 0xD800 && c1 < 0xDC00 && s.compare(p, 2, "\\u") == 0) {
            p += 2;
            uint32_t c2 = hex4();
            c1 = 0x10000 + ((c1 - 0xD800) << 10) + (c2 - 0xDC00);
          }
          utf8(out, c1);
          break;
        }
        default: bad("Invalid \\escape");
      }
    }
  }
  Json number() {
    size_t start = p;
    Json j;
    j.type = Json::Number;
    j.is_int = true;
    if (s[p] == '-') ++p;
    if (p >= s.size() || !isdigit(static_cast<unsigned char>(s[p]))) bad("Expecting value");
    while (p < s.size() && isdigit(static_cast<unsigned char>(s[p]))) ++p;
    if (p < s.size() && s[p] == '.') {
      j.is_int = false;
      ++p;
      if (p >= s.size() || !isdigit(static_cast<unsigned char>(s[p]))) bad("Expecting digits");
      while (p < s.size() && isdigit(static_cast<unsigned char>(s[p]))) ++p;
    }
    if (p < s.size() && (s[p] == 'e' || s[p] == 'E')) {
      j.is_int = false;
      ++p;
      if (p < s.size() && (s[p] == '+' || s[p] == '-')) ++p;
      if (p >= s.size() || !isdigit(static_cast<unsigned char>(s[p]))) bad("Expecting digits");
      while (p < s.size() && isdigit(static_cast<unsigned char>(s[p]))) ++p;
    }
    std::string text = s.substr(start, p - start);
    j.num = std::strtod(text.c_str(), nullptr);
    if (j.is_int) {
      errno = 0;
      long long v = std::strtoll(text.c_str(), nullptr, 10);
      if (errno == ERANGE) j.is_int = false;  // beyond int64: kept as a number only
      j.i = v;
    }
    return j;
  }
  Json value(int depth) {
    if (depth > 200) bad("Nesting too deep");
    ws();
    if (p >= s.size()) bad("Expecting value");
    Json j;
    char c = s[p];
    if (c == '{') {
      j.type = Json::Object;
      ++p;
      ws();
      if (p < s.size() && s[p] == '}') {
        ++p;
        return j;
      }
      while (true) {
        ws();
        if (p >= s.size() || s[p] != '"') bad("Expecting property name enclosed in double quotes");
        std::string key = string();
        ws();
        if (p >= s.size() || s[p] != ':') bad("Expecting ':' delimiter");
        ++p;
        Json v = value(depth + 1);
        bool replaced = false;  // Python keeps the last of duplicate keys
        for (auto& kv : j.obj)
          if (kv.first == key) {
            kv.second = std::move(v);
            replaced = true;
          }
        if (!replaced) j.obj.emplace_back(std::move(key), std::move(v));
        if (closed('}')) return j;
      }
    }
    if (c == '[') {
      j.type = Json::Array;
      ++p;
      ws();
      if (p < s.size() && s[p] == ']') {
        ++p;
        return j;
      }
      while (true) {
        j.arr.push_back(value(depth + 1));
        if (closed(']')) return j;
      }
    }
    if (c == '"') {
      j.type = Json::String;
      j.str = string();
      return j;
    }
    if (lit("true")) {
      j.type = Json::Bool;
      j.b = true;
      return j;
    }
    if (lit("false")) {
      j.type = Json::Bool;
      return j;
    }
    if (lit("null")) return j;
    // Python's json writes and reads these; validation refuses them where a number is needed.
    double special = 0;
    if (lit("NaN")) special = NAN;
    else if (lit("Infinity")) special = INFINITY;
    else if (lit("-Infinity")) special = -INFINITY;
    if (special != 0 || std::isnan(special)) {
      j.type = Json::Number;
      j.num = special;
      return j;
    }
    if (c == '-' || isdigit(static_cast<unsigned char>(c))) return number();
    bad("Expecting value");
  }
};

}  // namespace

Json Json::parse(const std::string& text) {
  Parser ps{text};
  Json j = ps.value(0);
  ps.ws();
  if (ps.p != text.size()) ps.bad("Extra data");
  return j;
}

std::string Json::repr() const {
  std::ostringstream o;
  switch (type) {
    case Null: return "None";
    case Bool: return b ? "True" : "False";
    case Number:
      if (is_int) return std::to_string(i);
      if (std::isnan(num)) return "nan";
      if (std::isinf(num)) return num > 0 ? "inf" : "-inf";
      for (int prec = 1; prec <= 17; ++prec) {  // the shortest repr that reads back, as Python's
        char buf[40];
        std::snprintf(buf, sizeof buf, "%.*g", prec, num);
        if (std::strtod(buf, nullptr) == num) {
          std::string r = buf;
          if (r.find_first_of(".e") == std::string::npos) r += ".0";
          return r;
        }
      }
      o << num;
      return o.str();
    case String: return "'" + str + "'";
    case Array: {
      o << "[";
      for (size_t k = 0; k < arr.size(); ++k) o << (k ? ", " : "") << arr[k].repr();
      o << "]";
      return o.str();
    }
    case Object: {
      o << "{";
      for (size_t k = 0; k < obj.size(); ++k)
        o << (k ? ", " : "") << "'" << obj[k].first << "': " << obj[k].second.repr();
      o << "}";
      return o.str();
    }
  }
  return "?";
}

}  // namespace gdx

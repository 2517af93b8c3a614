// The OpenVINO engine: reads the build's ONNX files with ov::Core (CPU by default).
#include <openvino/op/constant.hpp>
#include <openvino/op/convolution.hpp>
#include <openvino/op/group_conv.hpp>
#include <openvino/op/parameter.hpp>
#include <openvino/openvino.hpp>

#include "common.hpp"

namespace gdx {
namespace {

// A private copy of the constant subgraph feeding `out` (Constants copied, not shared), or
// `out` itself where it depends on a model input.
ov::Output<ov::Node> copy_constant_subgraph(const ov::Output<ov::Node>& out) {
  auto node = out.get_node_shared_ptr();
  if (auto c = std::dynamic_pointer_cast<ov::op::v0::Constant>(node)) {
    auto copy = std::make_shared<ov::op::v0::Constant>(c->get_element_type(), c->get_shape(),
                                                       c->get_data_ptr());
    return copy->output(0);
  }
  if (std::dynamic_pointer_cast<ov::op::v0::Parameter>(node)) return out;
  ov::OutputVector inputs;
  for (const auto& in : node->input_values()) {
    auto copied = copy_constant_subgraph(in);
    if (copied.get_node() == in.get_node()) return out;  // not constant all the way down
    inputs.push_back(copied);
  }
  return node->clone_with_new_inputs(inputs)->output(out.get_index());
}

// OpenVINO (2024-2026 at least) computes a ConvTranspose wrongly when its weight constant is
// shared with a Convolution, which the classifier-gradient graphs do (the backward pass of a
// convolution reuses its weight). Each transposed convolution gets its own copy of its weight.
int unshare_transposed_conv_weights(const std::shared_ptr<ov::Model>& model) {
  int copied = 0;
  for (const auto& op : model->get_ordered_ops()) {
    if (!ov::is_type<ov::op::v1::ConvolutionBackpropData>(op) &&
        !ov::is_type<ov::op::v1::GroupConvolutionBackpropData>(op))
      continue;
    auto weight = op->input_value(1);
    if (weight.get_target_inputs().size() < 2) continue;
    auto copy = copy_constant_subgraph(weight);
    if (copy.get_node() == weight.get_node()) continue;
    op->input(1).replace_source_output(copy);
    ++copied;
  }
  if (copied) model->validate_nodes_and_infer_types();
  return copied;
}

ov::element::Type element_of(const std::string& dtype) {
  if (dtype == "float32") return ov::element::f32;
  if (dtype == "int64") return ov::element::i64;
  fail(GDX_ERR_ENGINE, "unsupported feed dtype " + dtype);
}

class OpenVinoEngine final : public Engine {
 public:
  OpenVinoEngine(const std::string& path, const Artifact& a, const std::string& device, int threads)
      : artifact_(a) {
    try {
      std::shared_ptr<ov::Model> model = core_.read_model(path);
      std::vector<std::string> names;
      for (const auto& in : model->inputs()) names.push_back(in.get_any_name());
      for (const auto& spec : a.inputs) {
        bool found = false;
        for (const auto& n : names) found |= n == spec.name;
        if (!found) {
          std::string got;
          for (const auto& n : names) got += (got.empty() ? "" : ", ") + n;
          fail(GDX_ERR_ENGINE, path + " has inputs [" + got + "], but the manifest lists an input '" +
                                   spec.name + "': rebuild the folder");
        }
      }
      unshare_transposed_conv_weights(model);
      ov::AnyMap config = {ov::hint::inference_precision(ov::element::f32),
                           ov::hint::performance_mode(ov::hint::PerformanceMode::LATENCY)};
      if (threads > 0) config.emplace(ov::inference_num_threads(threads));
      compiled_ = core_.compile_model(model, device, config);
      request_ = compiled_.create_infer_request();
      output_ = a.outputs.empty() ? compiled_.output(0).get_any_name() : a.outputs[0].name;
    } catch (const Failure&) {
      throw;
    } catch (const std::exception& e) {
      std::string msg = e.what();
      fail(GDX_ERR_ENGINE, "OpenVINO cannot load " + path + ": " + msg.substr(0, msg.find('\n')) +
                               " (a corrupt or truncated file: rebuild it)");
    }
  }

  void run(const std::vector<Feed>& feeds, std::vector<float>& out) override {
    check_feeds(artifact_, feeds);
    try {
      for (const auto& f : feeds) {
        ov::Shape shape(f.shape.begin(), f.shape.end());
        request_.set_tensor(f.name, ov::Tensor(element_of(f.dtype), shape, const_cast<void*>(f.data)));
      }
      request_.infer();
      ov::Tensor t = request_.get_tensor(output_);
      out.resize(t.get_size());
      if (t.get_element_type() == ov::element::f32) {
        std::memcpy(out.data(), t.data<float>(), t.get_byte_size());
      } else if (t.get_element_type() == ov::element::f16) {
        const ov::float16* p = t.data<ov::float16>();
        for (size_t k = 0; k < out.size(); ++k) out[k] = static_cast<float>(p[k]);
      } else {
        fail(GDX_ERR_ENGINE, artifact_.file + ": output '" + output_ + "' is " +
                                 t.get_element_type().get_type_name() + ", expected float32");
      }
    } catch (const Failure&) {
      throw;
    } catch (const std::exception& e) {
      std::string msg = e.what();
      fail(GDX_ERR_ENGINE, "OpenVINO failed running " + artifact_.file + ": " + msg.substr(0, msg.find('\n')));
    }
  }

 private:
  Artifact artifact_;
  ov::Core core_;
  ov::CompiledModel compiled_;
  ov::InferRequest request_;
  std::string output_;
};

}  // namespace

std::unique_ptr<Engine> open_openvino(const std::string& path, const Artifact& a,
                                      const std::string& device, int threads) {
  return std::make_unique<OpenVinoEngine>(path, a, device, threads);
}

}  // namespace gdx

#include "check/golden.h"

#include "cuda/cuda_lane.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <tuple>

#include "check/safetensors.h"
#include "reference/reference.h"

namespace mamba3::check {
namespace {

using json = nlohmann::json;

// The tensors of one case, by role ("in", "out", "cot", "grad") and name.
using RoleMap = std::map<std::string, std::map<std::string, const HostTensor*>>;

constexpr const char* kRoles[] = {"in", "out", "cot", "grad"};

// Golden tensor name -> field of Inputs / Grads (same names for an input and its gradient).
template <typename Args>
Tensor* input_slot(Args& a, const std::string& name) {
  static const std::map<std::string, Tensor Args::*> kFields = {
      {"Q", &Args::q},           {"K", &Args::k},           {"V", &Args::v},
      {"ADT", &Args::adt},       {"DT", &Args::dt},         {"Trap", &Args::trap},
      {"Q_bias", &Args::q_bias}, {"K_bias", &Args::k_bias}, {"Angles", &Args::angles},
      {"D", &Args::d},           {"Z", &Args::z},           {"MIMO_V", &Args::mimo_v},
      {"MIMO_Z", &Args::mimo_z}, {"MIMO_O", &Args::mimo_o},
  };
  if (auto it = kFields.find(name); it != kFields.end()) return &(a.*(it->second));
  if (name == "state_angle") return &a.initial.angle;
  if (name == "state_ssm") return &a.initial.ssm;
  if (name == "state_k") return &a.initial.k;
  if (name == "state_v") return &a.initial.v;
  return nullptr;
}

// "state_<x>" (out role) / "dstate_<x>" (cot role) -> field of States.
Tensor* state_slot(States& s, const std::string& x) {
  if (x == "angle") return &s.angle;
  if (x == "ssm") return &s.ssm;
  if (x == "k") return &s.k;
  if (x == "v") return &s.v;
  return nullptr;
}

constexpr const char* kStateNames[] = {"state_angle", "state_ssm", "state_k", "state_v"};

Status case_error(const std::string& case_name, const std::string& what) {
  return Status::InvalidArgument("case '" + case_name + "': " + what);
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}

// One evaluation of a case: its buffers (in one float dtype) and the argument structs viewing
// them. The inputs are shared views of the golden file's tensors.
struct Evaluation {
  HostTensor out;
  std::map<std::string, HostTensor> final_states;  // by golden name ("state_ssm", ...)
  HostTensor d_out;
  std::map<std::string, HostTensor> d_final;  // by golden name ("dstate_ssm", ...)
  std::map<std::string, HostTensor> grads;    // by golden name ("Q", ...)
  ForwardArgs fwd;
  BackwardArgs bwd;
};

// What a case needs, checked once against the config and the tensors present.
struct CaseSpec {
  std::string name;
  Inputs inputs;
  const HostTensor* y = nullptr;
  std::map<std::string, const HostTensor*> out_states;  // all four or empty
  const HostTensor* dy = nullptr;
  std::map<std::string, const HostTensor*> dstates;  // "dstate_<x>"
  std::map<std::string, const HostTensor*> grads;    // golden grad name -> reference value
};

Status int_key(const json& config, const char* key, int64_t* value) {
  auto it = config.find(key);
  if (it == config.end()) return Status::Ok();  // optional: shapes come from the tensors
  if (!it->is_number_integer()) {
    return Status::InvalidArgument(std::string("config key '") + key + "' is not an integer");
  }
  *value = it->get<int64_t>();
  return Status::Ok();
}

Status bool_key(const json& config, const char* key, bool fallback, bool* value) {
  *value = fallback;
  auto it = config.find(key);
  if (it == config.end()) return Status::Ok();
  if (!it->is_boolean()) {
    return Status::InvalidArgument(std::string("config key '") + key + "' is not a boolean");
  }
  *value = it->get<bool>();
  return Status::Ok();
}

Status build_spec(const std::string& case_name, const json& config, RoleMap& roles,
                  CaseSpec* spec) {
  spec->name = case_name;
  if (!config.is_object()) return case_error(case_name, "config is not a JSON object");
  std::string kind = "siso";
  if (auto it = config.find("kind"); it != config.end()) {
    if (!it->is_string() || (*it != "siso" && *it != "mimo")) {
      return case_error(case_name, "config 'kind' must be \"siso\" or \"mimo\"");
    }
    kind = it->get<std::string>();
  }
  Inputs& in = spec->inputs;
  if (auto it = config.find("rope_pairing"); it != config.end()) {
    if (*it == "interleaved") {
      in.rope_pairing = RopePairing::kInterleaved;
    } else if (*it == "halved") {
      in.rope_pairing = RopePairing::kHalved;
    } else {
      return case_error(case_name,
                        "config 'rope_pairing' must be \"interleaved\" or \"halved\", "
                        "got " +
                            it->dump());
    }
  }

  // Inputs.
  for (const auto& [name, t] : roles["in"]) {
    if (name == "cu_seqlens") {
      in.cu_seqlens = t->view();
      continue;
    }
    Tensor* slot = input_slot(in, name);
    if (slot == nullptr) return case_error(case_name, "unknown input tensor 'in." + name + "'");
    *slot = t->view();
  }
  for (const char* required : {"Q", "K", "V", "ADT", "DT", "Trap", "Q_bias", "K_bias", "Angles"}) {
    if (!roles["in"].count(required)) {
      return case_error(case_name, std::string("missing input tensor 'in.") + required + "'");
    }
  }
  bool states = false, varlen = false;
  for (auto [key, fallback, value] : {std::tuple{"states", in.initial.any(), &states},
                                      {"varlen", in.cu_seqlens.defined(), &varlen}}) {
    Status st = bool_key(config, key, fallback, value);
    if (!st.ok()) return case_error(case_name, st.message());
  }
  if (states != in.initial.all() || (!states && in.initial.any())) {
    return case_error(case_name,
                      std::string("config says states=") + (states ? "true" : "false") +
                          " but the file has " + (in.initial.any() ? "some" : "none") +
                          " of in.state_{angle,ssm,k,v}" +
                          (in.initial.any() && !in.initial.all() ? " (not all four)" : ""));
  }
  if (varlen != in.cu_seqlens.defined()) {
    return case_error(case_name, std::string("config says varlen=") + (varlen ? "true" : "false") +
                                     " but in.cu_seqlens is " +
                                     (in.cu_seqlens.defined() ? "present" : "absent"));
  }
  if (kind == "siso" && (in.mimo_v.defined() || in.mimo_z.defined() || in.mimo_o.defined())) {
    return case_error(case_name, "kind siso with MIMO_V/MIMO_Z/MIMO_O inputs");
  }
  // The config's dimensions, where given, must match the tensors (catches mislabeled files).
  int64_t B = -1, L = -1, H = -1, P = -1, N = -1;
  for (auto [key, value] : {std::pair{"B", &B}, {"L", &L}, {"H", &H}, {"P", &P}, {"N", &N}}) {
    Status st = int_key(config, key, value);
    if (!st.ok()) return case_error(case_name, st.message());
  }
  const std::vector<int64_t>& v_shape = roles["in"]["V"]->shape();
  const std::vector<int64_t> v_expected = {B, L, H, P};
  for (size_t i = 0; i < 4; ++i) {
    if (v_shape.size() != 4 || (v_expected[i] >= 0 && v_shape[i] != v_expected[i])) {
      return case_error(case_name, "in.V has shape " + shape_str(v_shape) +
                                       ", config says (B, L, H, P) = " + shape_str(v_expected));
    }
  }
  const std::vector<int64_t>& q_shape = roles["in"]["Q"]->shape();
  if (N >= 0 && (q_shape.empty() || q_shape.back() != N)) {
    return case_error(case_name, "in.Q has shape " + shape_str(q_shape) +
                                     ", config says N = " + std::to_string(N));
  }

  // Reference outputs.
  for (const auto& [name, t] : roles["out"]) {
    if (name == "y") {
      spec->y = t;
    } else if (name.rfind("state_", 0) == 0 && state_slot(in.initial, name.substr(6))) {
      spec->out_states[name] = t;
    } else {
      return case_error(case_name, "unknown output tensor 'out." + name + "'");
    }
  }
  if (spec->y == nullptr) return case_error(case_name, "missing output tensor 'out.y'");
  if (!spec->out_states.empty() && spec->out_states.size() != 4) {
    return case_error(case_name, "the file has some but not all four out.state_* tensors");
  }

  // Cotangents and gradients.
  for (const auto& [name, t] : roles["cot"]) {
    if (name == "dy") {
      spec->dy = t;
    } else if (name.rfind("dstate_", 0) == 0 && state_slot(in.initial, name.substr(7))) {
      spec->dstates[name] = t;
    } else {
      return case_error(case_name, "unknown cotangent tensor 'cot." + name + "'");
    }
  }
  for (const auto& [name, t] : roles["grad"]) {
    Inputs probe;
    if (input_slot(probe, name) == nullptr) {
      return case_error(case_name, "unknown gradient tensor 'grad." + name + "'");
    }
    auto it = roles["in"].find(name);
    if (it == roles["in"].end()) {
      return case_error(case_name, "gradient 'grad." + name + "' of an input the file lacks");
    }
    if (it->second->shape() != t->shape()) {
      return case_error(case_name, "grad." + name + " has shape " + shape_str(t->shape()) +
                                       ", in." + name + " has " + shape_str(it->second->shape()));
    }
    spec->grads[name] = t;
  }
  if (!spec->grads.empty() && spec->dy == nullptr) {
    return case_error(case_name, "gradients given but no cotangent 'cot.dy'");
  }
  return Status::Ok();
}

// Buffers and argument structs for one evaluation in float dtype `fdt`.
void prepare(const CaseSpec& spec, DType fdt, Lane lane, Evaluation* e) {
  e->fwd = ForwardArgs{};
  e->fwd.in = spec.inputs;
  e->fwd.lane = lane;
  e->out = HostTensor(fdt, spec.y->shape());
  e->fwd.out = e->out.view();
  for (const auto& [name, t] : spec.out_states) {
    HostTensor& buf = e->final_states[name] = HostTensor(fdt, t->shape());
    *state_slot(e->fwd.final_states, name.substr(6)) = buf.view();
  }
  e->bwd = BackwardArgs{};
  e->bwd.in = spec.inputs;
  e->bwd.lane = lane;
  if (spec.dy != nullptr) {
    e->d_out = spec.dy->to(fdt);
    e->bwd.d_out = e->d_out.view();
  }
  for (const auto& [name, t] : spec.dstates) {
    HostTensor& buf = e->d_final[name] = t->to(fdt);
    *state_slot(e->bwd.d_final, name.substr(7)) = buf.view();
  }
  for (const auto& [name, t] : spec.grads) {
    HostTensor& buf = e->grads[name] = HostTensor(fdt, t->shape());
    *input_slot(e->bwd.grads, name) = buf.view();
  }
}

// (metric name, got, reference, circular) of every compared quantity of an evaluation.
struct Pair {
  std::string name;
  const HostTensor* got;
  const HostTensor* ref;
  bool circular;
};

std::vector<Pair> forward_pairs(const CaseSpec& spec, const Evaluation& e) {
  std::vector<Pair> pairs = {{"out.y", &e.out, spec.y, false}};
  for (const char* name : kStateNames) {
    auto it = spec.out_states.find(name);
    if (it == spec.out_states.end()) continue;
    pairs.push_back({std::string("out.") + name, &e.final_states.at(name), it->second,
                     std::string(name) == "state_angle"});
  }
  return pairs;
}

std::vector<Pair> backward_pairs(const CaseSpec& spec, const Evaluation& e) {
  std::vector<Pair> pairs;
  for (const auto& [name, ref] : spec.grads) {
    pairs.push_back({"grad." + name, &e.grads.at(name), ref, false});
  }
  return pairs;
}

// Every value survives a round trip through float32 unchanged: the tensor holds (at most)
// float32 information, whatever its storage dtype (raw inputs passed through, such as the
// final v state, qualify too; rounding the result changes nothing for them).
bool float32_exact(const std::vector<double>& values) {
  return std::all_of(values.begin(), values.end(), [](double v) {
    return static_cast<double>(static_cast<float>(v)) == v || std::isnan(v);
  });
}

Status with_context(const std::string& what, const Status& st) {
  return Status(st.code(), what + ": " + st.message());
}

// Relative L2 errors of the naive float32 evaluation, by metric name.
Status naive_errors(const CaseSpec& spec, std::map<std::string, double>* errors) {
  Evaluation e;
  prepare(spec, DType::kF32, Lane::kReference, &e);
  Status st = validate(e.fwd);
  if (!st.ok()) return with_context("naive float32 forward", st);
  st = reference::forward<float>(e.fwd);
  if (!st.ok()) return with_context("naive float32 forward", st);
  for (const Pair& p : forward_pairs(spec, e)) {
    (*errors)[p.name] =
        compare(p.name, p.got->to_double(), p.ref->to_double(), 0, p.circular).rel_l2;
  }
  if (spec.grads.empty()) return Status::Ok();
  st = validate(e.bwd);
  if (!st.ok()) return with_context("naive float32 backward", st);
  st = reference::backward<float>(e.bwd);
  if (!st.ok()) return with_context("naive float32 backward", st);
  for (const Pair& p : backward_pairs(spec, e)) {
    (*errors)[p.name] = compare(p.name, p.got->to_double(), p.ref->to_double(), 0, false).rel_l2;
  }
  return Status::Ok();
}

void run_case(const CaseSpec& spec, Lane lane, bool forward_only, CaseReport* report) {
  const bool is_reference = lane == Lane::kReference;
  // The cuda lane runs on device copies of the host buffers.
  const bool staged = lane == Lane::kCuda;
  // The lane first: an unavailable lane is reported without running anything else.
  Evaluation e;
  prepare(spec, is_reference ? DType::kF64 : DType::kF32, lane, &e);
  report->status = staged ? cuda::forward_staged(e.fwd) : forward(e.fwd);
  if (!report->status.ok()) return;
  const Status backward_status = spec.grads.empty() || forward_only ? Status::Ok()
                                 : staged                          ? cuda::backward_staged(e.bwd)
                                                                   : backward(e.bwd);

  std::map<std::string, double> naive;
  if (!is_reference) {
    report->status = naive_errors(spec, &naive);
    if (!report->status.ok()) return;
  }
  auto add_metrics = [&](const std::vector<Pair>& pairs) {
    for (const Pair& p : pairs) {
      const std::vector<double> ref = p.ref->to_double();
      std::vector<double> got = p.got->to_double();
      const double tol =
          is_reference ? kReferenceTolerance : tolerance_from_naive(naive.at(p.name));
      std::string name = p.name;
      // A reference holding only float32 information (every value float32-exact; the bundled
      // grad.state_ssm tensors were stored that way) is compared with the result rounded to
      // float32: what it can confirm, at the unchanged tolerance.
      if (float32_exact(ref)) {
        for (double& v : got) v = static_cast<float>(v);
        name += " [ref fp32]";
      }
      report->metrics.push_back(compare(name, got, ref, tol, p.circular));
    }
  };
  add_metrics(forward_pairs(spec, e));
  report->status = backward_status;
  if (!report->status.ok()) return;
  if (!forward_only) add_metrics(backward_pairs(spec, e));
  report->pass =
      !report->metrics.empty() && std::all_of(report->metrics.begin(), report->metrics.end(),
                                              [](const Metric& m) { return m.pass; });
}

}  // namespace

Status run_golden_file(const std::string& path, Lane lane, std::vector<CaseReport>* reports,
                       bool forward_only) {
  if (lane == Lane::kCuda && cuda::device_count() == 0)
    return Status::NotSupported("golden runner: no CUDA device (" + cuda::device_summary() + ")");
  SafetensorsFile file;
  Status st = read_safetensors(path, &file);
  if (!st.ok()) return st;
  auto cases_it = file.metadata.find("cases");
  if (cases_it == file.metadata.end()) {
    return Status::InvalidArgument(path + ": no 'cases' in the metadata (not a golden file?)");
  }
  json cases = json::parse(cases_it->second, nullptr, /*allow_exceptions=*/false);
  if (cases.is_discarded() || !cases.is_object() || cases.empty()) {
    return Status::InvalidArgument(path + ": metadata 'cases' is not a non-empty JSON object");
  }

  // Sort the tensors into cases and roles; every tensor must belong to exactly one.
  std::map<std::string, RoleMap> by_case;
  for (const auto& [name, tensor] : file.tensors) {
    std::string case_name;
    for (const auto& [c, config] : cases.items()) {
      if (name.rfind(c + ".", 0) == 0 && c.size() > case_name.size()) case_name = c;
    }
    if (case_name.empty()) {
      return Status::InvalidArgument(path + ": tensor '" + name + "' belongs to no case in " +
                                     "the metadata");
    }
    const std::string rest = name.substr(case_name.size() + 1);
    const size_t dot = rest.find('.');
    const std::string role = rest.substr(0, dot);
    if (dot == std::string::npos ||
        std::find(std::begin(kRoles), std::end(kRoles), role) == std::end(kRoles)) {
      return Status::InvalidArgument(path + ": tensor '" + name +
                                     "' has an unknown role (expected <case>.{in,out,cot,grad}." +
                                     "<name>)");
    }
    by_case[case_name][role][rest.substr(dot + 1)] = &tensor;
  }

  for (const auto& [case_name, config] : cases.items()) {
    CaseReport report;
    report.file = path;
    report.case_name = case_name;
    report.lane = lane_name(lane);
    CaseSpec spec;
    report.status = build_spec(case_name, config, by_case[case_name], &spec);
    if (report.status.ok()) run_case(spec, lane, forward_only, &report);
    if (!report.status.ok()) report.pass = false;
    reports->push_back(std::move(report));
  }
  return Status::Ok();
}

std::string golden_dir(const std::string& fallback) {
  const char* env = std::getenv("MAMBA3_GOLDEN_DIR");
  return env != nullptr && env[0] != '\0' ? std::string(env) : fallback;
}

Status list_golden_files(const std::string& dir, std::vector<std::string>* files) {
  files->clear();
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    if (entry.is_regular_file() && entry.path().extension() == ".safetensors") {
      files->push_back(entry.path().string());
    }
  }
  if (ec) return Status::InvalidArgument("golden directory " + dir + ": " + ec.message());
  if (files->empty()) {
    return Status::InvalidArgument("golden directory " + dir + " has no *.safetensors files");
  }
  std::sort(files->begin(), files->end());
  return Status::Ok();
}

}  // namespace mamba3::check

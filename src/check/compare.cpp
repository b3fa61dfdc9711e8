#include "check/compare.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>

namespace mamba3::check {
namespace {

// Wraps an angle difference into (-pi, pi].
double wrap_angle(double d) {
  double w = std::remainder(d, 2.0 * std::numbers::pi);  // [-pi, pi]
  return w <= -std::numbers::pi ? w + 2.0 * std::numbers::pi : w;
}

}  // namespace

Metric compare(std::string name, const std::vector<double>& got, const std::vector<double>& ref,
               double tolerance, bool circular) {
  Metric m;
  m.name = std::move(name);
  m.tolerance = tolerance;
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  if (got.size() != ref.size()) {
    m.rel_l2 = m.max_abs_err = kNaN;
    m.pass = false;
    return m;
  }
  double diff2 = 0, ref2 = 0;
  bool has_nan = false;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i]) || std::isnan(ref[i])) {
      if (!has_nan) {
        m.worst_index = static_cast<int64_t>(i);
        m.worst_got = got[i];
        m.worst_ref = ref[i];
      }
      has_nan = true;
      continue;
    }
    double d = got[i] - ref[i];
    if (circular) d = wrap_angle(d);
    const double a = std::fabs(d);
    diff2 += d * d;
    ref2 += ref[i] * ref[i];
    if (!has_nan && (m.worst_index < 0 || a > m.max_abs_err)) {
      m.max_abs_err = a;
      m.worst_index = static_cast<int64_t>(i);
      m.worst_got = got[i];
      m.worst_ref = ref[i];
    }
  }
  if (has_nan) {
    m.rel_l2 = m.max_abs_err = kNaN;
    m.pass = false;
    return m;
  }
  m.rel_l2 = std::sqrt(diff2) / std::max(std::sqrt(ref2), 1e-300);
  m.pass = m.rel_l2 <= tolerance;  // false for NaN/inf
  return m;
}

std::string format_metric_header() {
  return fmt::format("  {:<28} {:>10} {:>10} {:>8} {:>13} {:>13} {:>9}  {}", "metric", "rel L2",
                     "max abs", "worst@", "got", "ref", "tol", "result");
}

std::string format_metric(const Metric& m) {
  return fmt::format("  {:<28} {:>10.3e} {:>10.3e} {:>8} {:>13.6e} {:>13.6e} {:>9.2e}  {}", m.name,
                     m.rel_l2, m.max_abs_err, m.worst_index, m.worst_got, m.worst_ref, m.tolerance,
                     m.pass ? "PASS" : "FAIL");
}

}  // namespace mamba3::check

// Error metrics of a lane's result against a reference (CONVENTIONS: relative L2 error and the
// worst element, never percentiles), and the tolerance recipe of the fast lanes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mamba3::check {

struct Metric {
  std::string name;
  double rel_l2 = 0;         // ||got - ref|| / max(||ref||, 1e-300); NaN when got has a NaN
  double max_abs_err = 0;    // max |got - ref|
  int64_t worst_index = -1;  // flat index of max |got - ref| (-1: empty or size mismatch)
  double worst_got = 0, worst_ref = 0;
  double tolerance = 0;
  bool pass = false;  // rel_l2 <= tolerance
};

// `circular`: differences are wrapped into (-pi, pi] first (angles). Sizes must match; a size
// mismatch fails with rel_l2 = NaN.
Metric compare(std::string name, const std::vector<double>& got, const std::vector<double>& ref,
               double tolerance, bool circular = false);

// One fixed-width line: name, rel L2, max abs err, worst index, got, ref, tolerance, PASS/FAIL.
std::string format_metric(const Metric& m);
// Column titles matching format_metric.
std::string format_metric_header();

// Tolerance of a float32 lane (DESIGN.md §6): twice the error of a naive float32 evaluation of
// the same recurrence against the same reference, plus a floor.
inline constexpr double kToleranceFloor = 1e-5;
inline double tolerance_from_naive(double err_naive) { return 2.0 * err_naive + kToleranceFloor; }

// Tolerance of the float64 reference lane against the golden vectors.
inline constexpr double kReferenceTolerance = 1e-10;

}  // namespace mamba3::check

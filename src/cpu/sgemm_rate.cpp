// The fp32 matrix-multiply rate of the matrix library the cpu lane uses, measured on all the
// threads asked for (this translation unit lets Eigen parallelize its products).
#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

#include "cpu/cpu_lane.h"

namespace mamba3::cpu {

using RMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

double measure_sgemm_gflops(int n, int num_threads, double min_seconds) {
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const int saved = Eigen::nbThreads();
  Eigen::setNbThreads(threads);
  RMat A = RMat::Random(n, n), B = RMat::Random(n, n), Cm(n, n);
  Cm.noalias() = A * B;  // warm-up
  std::vector<double> rates;
  double total = 0;
  while (total < min_seconds || rates.size() < 5) {
    auto t0 = std::chrono::steady_clock::now();
    Cm.noalias() = A * B;
    double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    total += sec;
    rates.push_back(2.0 * n * static_cast<double>(n) * n / sec * 1e-9);
  }
  Eigen::setNbThreads(saved);
  std::sort(rates.begin(), rates.end());
  // Keep the result alive so the products are not optimized away.
  if (!std::isfinite(Cm(0, 0))) return 0.0;
  return rates[rates.size() / 2];
}

}  // namespace mamba3::cpu

// mpi_none.cpp — the MPI entry points of a build without MPI: there is only one process.
#include <cstdlib>

#include "core/error.h"
#include "dist/mpi_backend.h"

namespace moe::dist {

bool mpi_backend_available() { return false; }
std::unique_ptr<Communicator> mpi_world() { MOE_FAIL("this build of moe has no MPI"); }
void mpi_set_timeout(double) {}
void mpi_abort(int code) { std::exit(code); }
void mpi_finalize() {}

}  // namespace moe::dist

// mpi_backend.h — what communicator.cpp needs from the MPI implementation (mpi_communicator.cpp
// with MPI, mpi_none.cpp without). Internal to src/dist/.
#pragma once
#include <memory>

#include "dist/communicator.h"

namespace moe::dist {

bool mpi_backend_available();
std::unique_ptr<Communicator> mpi_world();  // initialises MPI
void mpi_set_timeout(double seconds);
[[noreturn]] void mpi_abort(int code);
void mpi_finalize();

}  // namespace moe::dist

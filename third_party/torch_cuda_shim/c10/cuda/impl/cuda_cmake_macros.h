// SPDX-License-Identifier: Apache-2.0
// Stand-in for the header that torch's CUDA builds generate from cuda_cmake_macros.h.in and
// that the CPU wheels do not ship. Used only by `make cuda-check` (compile without linking on a
// machine whose torch is CPU-only), placed after torch's include paths so that a CUDA torch's
// own copy wins. The real build (CMake with a CUDA torch) never sees this directory.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS

// microbatch: header-only micro-batching for C++20. The one header to include.
// SPDX-License-Identifier: Apache-2.0
#pragma once

#include "batcher.hpp"       // IWYU pragma: export
#include "clock.hpp"         // IWYU pragma: export
#include "data_loader.hpp"   // IWYU pragma: export
#include "errors.hpp"        // IWYU pragma: export
#include "keyed_batcher.hpp" // IWYU pragma: export
#include "options.hpp"       // IWYU pragma: export
#include "outcome.hpp"       // IWYU pragma: export
#include "worker_pool.hpp"   // IWYU pragma: export

#define MICROBATCH_VERSION_MAJOR 0
#define MICROBATCH_VERSION_MINOR 1
#define MICROBATCH_VERSION_PATCH 0

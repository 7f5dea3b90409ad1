# SPDX-License-Identifier: Apache-2.0
import os

import pytest
import torch

import tilefuse

# Seeded random sweeps grow with TILEFUSE_TEST_SWEEP (default 1 = the quick CI sweep).
SWEEP = int(os.environ.get("TILEFUSE_TEST_SWEEP", "1"))

CPU_ISAS = ["cpu-avx2", "cpu-generic"] if tilefuse.cpu_isa() == "cpu-avx2" else ["cpu-generic"]


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    """Runs a test once per CPU kernel tier the machine supports."""
    with tilefuse.backend.use_cpu_isa(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

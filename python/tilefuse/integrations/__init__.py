# SPDX-License-Identifier: Apache-2.0
"""Adapters for third-party model code (imported lazily; tilefuse never requires them)."""

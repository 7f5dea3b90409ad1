# SPDX-License-Identifier: Apache-2.0
"""The only Python that touches ``torch.ops.tilefuse``: fake impls and autograd per family."""

from . import attention  # noqa: F401
from . import block_sparse  # noqa: F401
from . import lowbit  # noqa: F401
from . import neighborhood  # noqa: F401

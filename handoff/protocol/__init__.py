"""The handoff protocol, sans-IO (DESIGN section 7, layer L1): no sockets, no trio, no
hypervisor. `local` is the intra-host conversation, its messages, the recovery table and the
token challenge."""

from handoff.protocol.local import *  # noqa: F403
from handoff.protocol.local import __all__ as __all__

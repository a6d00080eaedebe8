"""entropy_lab: is the change in a policy's token entropy after one RL step linear in η?"""

from __future__ import annotations

__version__ = "0.1.0"

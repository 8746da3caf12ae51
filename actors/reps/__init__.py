"""Incremental repetition counting and quality metrics from MediaPipe Pose landmarks.

Public API::

    from actors.reps import RepEngine, Rep, PROFILES, profile_for
"""

from .engine import RepEngine
from .profiles import PROFILES, Profile, profile_for
from .rep import Rep

__all__ = ["PROFILES", "Profile", "Rep", "RepEngine", "profile_for"]

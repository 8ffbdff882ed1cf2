"""The tools layer: the ``detloss`` command (``cli``), worked explanations (``explain``),
assignment pictures (``viz``) and the demo detector (``demo``).

The core (:mod:`detloss` and everything outside ``detloss.tools``) never imports this layer;
the tools use the core's public API only.
"""

"""A loss worked step by step with real numbers: ``detloss explain LOSS --input ... --target ...``.

Python API::

    from detloss.tools.explain import explain
    e = explain("bce-with-logits", [0.7, 0.2, 0.1], [1, 0, 0])
    print(e.render())          # sigmoids, each term with its formula, the reduction, the gradient
    e.result                   # the value detloss.functional.bce_with_logits returns
    e.to_dict()                # the same as plain data (what ``--json`` prints)
    e.check([0.6486])          # checks a claimed value; says where it goes wrong

The result always comes from :mod:`detloss.functional` (the same call a user would make); the
intermediate numbers (sigmoid, p_t, alpha_t, log-sum-exp, IoU terms, ...) are computed alongside
from the textbook formula of each loss, and the final step of that worked computation is checked
against the functional result (``Explanation.consistent``). The gradient is the one autograd
returns through the functional loss; where the closed form is short it is printed next to it.

A claim (``--expect``) is compared at the precision it is written with (0.4181 means
0.41805..0.41815). When it does not hold, every intermediate quantity and a set of common
slips (the other target branch, alpha or the modulating factor forgotten, logits read as
probabilities, another reduction, a log in another base, ...) are evaluated, each through
detloss.functional, and the ones that reproduce the claim are named.

How the package is laid out, and how a loss family is added:

- :mod:`.steps`: the data types (``Step``, ``Check``, ``Explanation``) and their rendering;
  :mod:`.family`: ``Spec`` (what one explainable loss declares) and helpers shared by families;
  :mod:`.claims`: checking a claimed value; :mod:`.api`: :func:`explain`; :mod:`.command`: the CLI.
- One module per loss family: :mod:`.bce`, :mod:`.cross_entropy`, :mod:`.focal`,
  :mod:`.regression`, :mod:`.iou`, :mod:`.dfl`, :mod:`.hungarian` (the matching cost of the
  set-prediction losses).
- A new family (say the matching cost of a set-prediction loss) is a new module here that
  defines ``SPECS = {"name": Spec(function, formula, source, options, work, call, ...)}`` and
  ``ALIASES = {}``: ``work`` returns the worked steps and the element-wise loss, ``call`` makes
  the detloss call whose value is the result, ``variants`` lists the slips to try when a claim
  does not hold. Add the module to ``FAMILIES`` in :mod:`.registry`; an option the command line
  does not have yet goes into :func:`.command.add_arguments` and ``OPTION_KEYS``. The tests in
  tests/cli/test_explain.py require every registered loss to appear in their cases.
"""
from __future__ import annotations

from .api import as_tensor, explain, parse_numbers
from .command import add_arguments, run
from .registry import ALIASES, FAMILIES, LOSSES
from .family import Spec
from .steps import Check, Explanation, Step

__all__ = ["explain", "Explanation", "Step", "Check", "LOSSES", "ALIASES", "FAMILIES", "Spec", "add_arguments", "run",
           "parse_numbers", "as_tensor"]

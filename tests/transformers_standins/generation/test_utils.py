"""Stand-in for transformers' ``tests/generation/test_utils.py``, which its sdist does not ship:
``GenerationTesterMixin`` is hf_fusion's own generation contract (``tests/generation_contract.py``)."""

from tests.generation_contract import GenerationContractMixin as GenerationTesterMixin

__all__ = ["GenerationTesterMixin"]

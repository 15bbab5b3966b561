"""Stand-in for transformers' ``tests/utils/test_configuration_utils.py``, which its sdist does not
ship: the common config fields (every ``PreTrainedConfig`` has them) that ``ConfigTester`` sets to
non-default values and expects back unchanged."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BartForConditionalGeneration"],
    "id2label": {0: "negative", 1: "positive"},
    "label2id": {"negative": 0, "positive": 1},
    "problem_type": "regression",
    "tie_word_embeddings": False,
}

"""The papers' analyses, run on a saved checkpoint: one module per analysis.

    layer_masking          EncoderFusion: drop X^0 or encoder layer n from the fusion at inference
    recurrence             recurrent stacking decoded at other depths; attention maps per depth step
    nonlinearity           depth-wise LSTM paper: one depth step replaced by a fitted linear map
    decoding_speed         recurrent stacking journal version: decoding speed of several checkpoints
    fusion_weights         EncoderFusion's fusion-weight heatmap averaged over seeds
    embedding_similarity   SurfaceFusion: cosine of lexicon-aligned source/target embeddings

Each module has a typed function and ``python -m hf_fusion.analysis.<name> CHECKPOINT ... --output
FILE`` that writes a Markdown / JSON table or a PNG. ``docs/analyses.md`` says what each measures
and what its paper claims.

Library code, not model code: nothing in the model files imports this package, so it is never
copied into a checkpoint. It reads test data through the training tool (``training.evaluate_file``
and ``training.data``), which is installed with hf_fusion.
"""

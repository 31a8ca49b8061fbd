"""SegCLR in TensorFlow/Keras: segmentation-guided contrastive embeddings of neurites and what they classify.

cutouts (segment-masked EM around skeleton nodes, model scale) -> pairs (same segment, geodesic distance) ->
encoder (3D ResNet -> 64-d embedding; projection head for training only) -> training (NT-Xent, checkpoints,
collapse monitor) -> embeddings (batched inference) -> aggregation (geodesic radius R) -> classifiers (linear /
residual MLP with confidence) + ood (distance-based out-of-distribution score); export (published CSV-in-ZIP
sharded layout); skeletons (kimimaro per block, merged per segment). Never imports pipeline/.
"""

from storage.tensorflow_env import configure as _configure_tensorflow

_configure_tensorflow()  # before any module of this package imports TensorFlow

from storage.tensorflow_env import configure as _configure_tensorflow

_configure_tensorflow()  # before any module of this package imports TensorFlow

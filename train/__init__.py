"""The Keras tutorial's MNIST MLP trained with adamjax, laid out as Flax's examples are.

Run ``python -m train.mnist`` from the repository root (or ``scripts/train``); ``train/mnist.py``
lists what each module holds. Not installed with the package: import it from the root.
"""

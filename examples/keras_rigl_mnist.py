"""MNIST with two genuinely sparse layers and Rig-L, in one model.fit (plain Keras)."""
import sys

import keras
import numpy as np

from ipu_sparse_ops.keras import RigL, SparseDense, to_dense

keras.utils.set_random_seed(0)
mnist = np.load(sys.argv[1] if len(sys.argv) > 1 else "data/mnist.npz")  # `make data` writes it
x_train = mnist["x_train"].reshape(-1, 784).astype("float32") / 255
x_test = mnist["x_test"].reshape(-1, 784).astype("float32") / 255
y_train, y_test = mnist["y_train"], mnist["y_test"]

model = keras.Sequential([
    keras.Input((784,)),
    SparseDense(512, density=0.1, activation="relu"),  # 10% of 784 x 512 connected
    keras.layers.Dropout(0.2),
    SparseDense(10, density=0.3),
])
model.compile(optimizer=keras.optimizers.Adam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=["accuracy"], steps_per_execution=50)

rigl = RigL(update_freq=100,        # prune and regrow every 100 steps,
            prune_ratio=0.3,        # moving up to 30% of each layer's connections,
            regrow="rigl",          # where the loss gradient is largest,
            schedule="cosine",      # fewer as training goes on,
            stop_fraction=0.75,     # and none in the last quarter.
            seed=0)
model.fit(x_train, y_train, batch_size=64, epochs=8, callbacks=[rigl], verbose=2)

loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
print(f"Test accuracy: {accuracy:.4f} after {len(rigl.history)} Rig-L updates")
dense = to_dense(model)  # plain Dense layers: runs wherever Keras does
assert np.allclose(dense.predict(x_test[:100], verbose=0), model.predict(x_test[:100], verbose=0),
                   atol=1e-4)

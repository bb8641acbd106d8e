"""Write the embedded demo: examples/digits-mlp.onnx and examples/digits.npz.

    python examples/make_example.py        # then: modelpress compress examples/digits-mlp.onnx \
                                            #   --recipe int8 --data examples/digits.npz ...

digits.npz holds the 450 held-out digits (input [450, 64] float32 in [0, 1], int64 labels): the
model never saw them, so they serve both to calibrate and to measure accuracy in the demo.
"""

from pathlib import Path

import zoo

HERE = Path(__file__).resolve().parent


def main() -> None:
    model = zoo.build_mlp(HERE)
    _, _, x_test, y_test = zoo.digits_data()
    data = zoo.write_data(HERE / "digits.npz", x_test, y_test)
    print(f"{model.name}: {model.stat().st_size} bytes, "
          f"accuracy {zoo.accuracy(model, x_test, y_test):.4f} on {len(y_test)} held-out digits")
    print(f"{data.name}: {data.stat().st_size} bytes")


if __name__ == "__main__":
    main()

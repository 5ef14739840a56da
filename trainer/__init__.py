"""visionqueue trainer: data, the transfer-learning recipe, evaluation, calibration, int8 artifacts.

Command-line entry points, each `python -m trainer.<name> --help`:

    trainer.synth      a synthetic metal-surface inspection set (ok / scratch / dent / stain)
    trainer.train      split, check, train, calibrate, quantize and write (and publish) an artifact
    trainer.evaluate   accuracy, macro-F1, per-class P/R, confusion matrix, false-alarm/miss, ECE
    trainer.quantize   int8 PTQ with both backends measured (accuracy, size, CPU speed)
    trainer.export     ONNX export of an artifact (needs the optional `onnx` package)
"""

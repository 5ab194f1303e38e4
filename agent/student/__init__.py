"""The student's contract: everything the runtime, the trainer and the exporter share about it.

One owner for the compact policy the project trains (docs/architecture.md),
kept beside its configuration as LeRobot keeps a policy's processing beside
its config:

| module | what | needs |
|---|---|---|
| `features` | the featuriser: observations to arrays, scores back to decisions | numpy, pillow |
| `config` | `ModelConfig`, the architecture's settings | stdlib |
| `modeling` | `Student`, the network | torch |
| `checkpoint` | a student version: write, verify, read (torch-free), load (torch) | safetensors + torch to load |
| `inference` | `TorchStudent`: a loaded version that decides a batch | torch |
| `onnx` | `OnnxRunner`: an exported student that decides a batch; the ONNX metadata keys | onnxruntime, no torch |

The learner (`trainer`) and the exporter (`export`) import this package; it
imports neither of them. Importing it imports nothing heavy.
"""


…
digits2.0.0@a80780970a3998f0e426bddeb7af028202504bb4fc03e2e9325394ccf3289732 ³›*onnx2
inputfloat32N@:!
probabilitiesfloat32N
:
labelint64NB
top1ΎΑ&Sο?digits-testJx86_64Jaarch64PX€ ¨ω‹4bed25519-1fc83751145a2a77jmlp@+CQ0JEΕ°8ZF†Ν‘βsχ­δ©Ύ΅RΧƒO/δbj›Υ6σύπαAΞΨ
FΧ”~φ΄¶
ed25519-1fc83751145a2a77
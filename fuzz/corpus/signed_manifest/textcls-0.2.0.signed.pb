
ˆ
textcls0.2.0@e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c ¼Þ#*onnx2
xfloat32???:2
save_infer_model/scale_0.tmp_1float32?B
top1¾Á&Sï?digits-testJx86_64Jaarch64PX€ ¨ù‹4bed25519-1fc83751145a2a77jmlp@N¼Y°H°Møcrk#,<>™nãaÝÙ[×¥ Áº€fÆä<ÜNCÕfQá„„´¹ó,õˆaï“a8x2Ö²Ùˆed25519-1fc83751145a2a77
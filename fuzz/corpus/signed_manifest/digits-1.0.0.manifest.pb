
digits1.0.0@a2548c61976d7687ddc92c70b77ef09758699d7fbe11f13f83ef0383075ec0c4 ÷š*onnx2
inputfloat32N@:!
probabilitiesfloat32N
:
labelint64NB
top1¾Á&Sï?digits-testJx86_64Jaarch64PX€ ¨ù‹4bed25519-1fc83751145a2a77jmlpr’
F
@bfa89767045c81f83dbfa7c5648283a35377123dcda9d83e60c3925681304c43€ÐE
@4493b2052e7b4258621d51f10f17a672594c5e3f2beaa1cf97c818dc583aafe7Àè
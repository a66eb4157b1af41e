"""Tolerances the tests share, each derived from the precision of what it compares."""

# A bfloat16 kernel output against fp32 maths: half a bfloat16 spacing (2^-8 relative at the bottom of a binade)
# plus the kernels' own error before rounding (SiLU's exp 7.5e-5, vrcp14ps 6e-5).
BF16_RTOL = 2**-8 + 2e-4

"""The model floor: DreamerV3's maths in plain torch (``maths``), the layers and the call sites that choose a C++ op
or its plain maths (``nets``), the RSSM, the world model and the actor-critic (``behavior``)."""

"""NN-CIFT: oracles, the InfluenceNetwork, sentence encoders, the pipeline that distils an oracle into a network, and selection with a pretrained one."""

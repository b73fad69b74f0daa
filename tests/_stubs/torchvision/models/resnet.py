class BasicBlock:  # never instantiated: only an isinstance target
    pass


class Bottleneck:
    pass

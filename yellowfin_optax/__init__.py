"""YellowFin for Optax: momentum SGD that tunes itself.

References:
  Zhang & Mitliagkas, `YellowFin and the Art of Momentum Tuning
  <https://arxiv.org/abs/1706.03471>`_, SysML 2018.
"""

from yellowfin_optax._alias import hyperparams
from yellowfin_optax._alias import yellowfin
from yellowfin_optax._momentum import tuned_momentum
from yellowfin_optax._momentum import TunedMomentumState
from yellowfin_optax._nonfinite import skip_nonfinite
from yellowfin_optax._nonfinite import SkipNonFiniteState
from yellowfin_optax._statistics import gradient_statistics
from yellowfin_optax._statistics import GradientStatisticsState
from yellowfin_optax._tuner import cubic_root
from yellowfin_optax._tuner import robust_momentum
from yellowfin_optax._tuner import tune
from yellowfin_optax._tuner import yellowfin_tuner
from yellowfin_optax._tuner import YellowFinTunerState

__version__ = '0.1.0'

"""YellowFin for Optax: momentum SGD that tunes itself.

References:
  Zhang & Mitliagkas, `YellowFin and the Art of Momentum Tuning
  <https://arxiv.org/abs/1706.03471>`_, SysML 2018.
"""

from yellowfin_optax._alias import yellowfin
from yellowfin_optax._alias import yellowfin_auto
from yellowfin_optax._checkpoint import check_state_compatible
from yellowfin_optax._checkpoint import restore_state
from yellowfin_optax._checkpoint import save_state
from yellowfin_optax._closed_loop import closed_loop
from yellowfin_optax._closed_loop import closed_loop_yellowfin
from yellowfin_optax._closed_loop import ClosedLoopState
from yellowfin_optax._closed_loop import masked_median
from yellowfin_optax._closed_loop import total_momentum
from yellowfin_optax._closed_loop import TotalMomentumState
from yellowfin_optax._delay import delayed_gradients
from yellowfin_optax._delay import DelayedGradientsState
from yellowfin_optax._hyperparams import hyperparams
from yellowfin_optax._momentum import momentum_updates
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

__all__ = [
    'ClosedLoopState',
    'DelayedGradientsState',
    'GradientStatisticsState',
    'SkipNonFiniteState',
    'TotalMomentumState',
    'TunedMomentumState',
    'YellowFinTunerState',
    'check_state_compatible',
    'closed_loop',
    'closed_loop_yellowfin',
    'cubic_root',
    'delayed_gradients',
    'gradient_statistics',
    'hyperparams',
    'masked_median',
    'momentum_updates',
    'restore_state',
    'save_state',
    'robust_momentum',
    'skip_nonfinite',
    'total_momentum',
    'tune',
    'tuned_momentum',
    'yellowfin',
    'yellowfin_auto',
    'yellowfin_tuner',
]

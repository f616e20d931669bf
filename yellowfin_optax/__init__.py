"""YellowFin for Optax: momentum SGD that tunes its own learning rate and momentum.

References:
  Zhang & Mitliagkas, `YellowFin and the Art of Momentum Tuning
  <https://arxiv.org/abs/1706.03471>`_, SysML 2018.
"""

from yellowfin_optax._closed_loop import closed_loop_yellowfin
from yellowfin_optax._closed_loop import ClosedLoopState
from yellowfin_optax._closed_loop import delayed_gradients
from yellowfin_optax._closed_loop import DelayedGradientsState
from yellowfin_optax._yellowfin import hyperparams
from yellowfin_optax._yellowfin import rms_direction
from yellowfin_optax._yellowfin import scale_by_yellowfin
from yellowfin_optax._yellowfin import yellowfin
from yellowfin_optax._yellowfin import yellowfin_auto
from yellowfin_optax._yellowfin import YellowFinState

__version__ = '0.2.0'

__all__ = [
    'ClosedLoopState',
    'DelayedGradientsState',
    'YellowFinState',
    'closed_loop_yellowfin',
    'delayed_gradients',
    'hyperparams',
    'rms_direction',
    'scale_by_yellowfin',
    'yellowfin',
    'yellowfin_auto',
]

"""Time the trainer's compiled step against the same body under plain jit and shard_map variants.

One CPU device, batch 256 x 2,000 genes, hidden 256, 10 classes. Prints ms per step for each
variant over several rounds, then the max |param difference| after one step against plain jit.
The shard_map variants keep their psum on the one-device mesh (XLA emits real all-reduces for it,
~20 % of the step on CPU); the trainer leaves that psum out on one device and matches plain jit
(benchmarks/RESULTS.md, section 4a).

    python benchmarks/bench_step_variants.py
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ginseng._core.mesh import make_mesh
from ginseng.augment import augment
from ginseng.nn import _cross_entropy, nn_annotate, nn_annotate_init
from ginseng.opt import opt_adam_update, opt_init_adam
from ginseng.train import GinsengTrainerSettings
from ginseng.train.step import build_train_step, cell_keys

G,C,B=2000,10,256
p0=nn_annotate_init(jax.random.key(0),G,C,256); s0=opt_init_adam(p0)
x=jnp.asarray(np.random.default_rng(0).poisson(1.0,(B,G)).astype(np.float32)); y=(jnp.arange(B)%C).astype(jnp.int32)
slot=jnp.arange(B,dtype=jnp.int32); mask=jnp.ones(B,bool)
mesh=make_mesh(jax.devices()[:1]); rep=NamedSharding(mesh,P()); dat=NamedSharding(mesh,P('data'))
cp=lambda t: jax.tree.map(lambda a: jnp.array(a, copy=True), t)
st=GinsengTrainerSettings(lr_schedule='constant')  # the body below uses a constant lr
def cell_loss(params,key,x,y):
    k_aug,k_nn=jax.random.split(key)
    x=augment(k_aug,x,None,None,None,None)
    return _cross_entropy(nn_annotate(params,k_nn,x,0.25,True,1e4,training=True),y)
def body(params,opt_state,metrics,key,x,y,slot,mask):
    keys=cell_keys(key,opt_state.step,slot)
    x=jnp.where(mask[:,None],x,0.0)
    def L(p):
        l=jax.vmap(cell_loss,in_axes=(None,0,0,0))(p,keys,x,y); return jnp.sum(jnp.where(mask,l,0.0))
    ls,g=jax.value_and_grad(L)(params); c=jnp.sum(mask.astype(jnp.float32))
    g=jax.tree.map(lambda a:a/jnp.maximum(c,1.),g)
    params,opt_state=opt_adam_update(g,params,opt_state,lr=1e-3,weight_decay=0.01)
    return params,opt_state,metrics+jnp.stack([ls,c])
args = lambda: (jax.device_put(cp(p0), rep), jax.device_put(cp(s0), rep), jax.device_put(jnp.zeros(2), rep))
data = (jax.device_put(jax.random.key(1), rep), jax.device_put(x, dat), jax.device_put(y, dat), jax.device_put(slot, dat), jax.device_put(mask, dat))
variants = {'trainer': build_train_step(st, mesh, total_steps=1), 'jit_body': jax.jit(body, donate_argnums=(0, 1, 2))}

from jax import lax


def mk(check_vma, auto):
    def local(params,opt_state,metrics,key,x,y,slot,mask):
        keys=cell_keys(key,opt_state.step,slot)
        x=jnp.where(mask[:,None],x,0.0)
        def L(p):
            l=jax.vmap(cell_loss,in_axes=(None,0,0,0))(p,keys,x,y); return jnp.sum(jnp.where(mask,l,0.0))
        ls,g=jax.value_and_grad(L)(params)
        c=jnp.sum(mask.astype(jnp.float32))
        if auto:   # autodiff already summed g over devices (check_vma=True semantics)
            ls,c=lax.psum((ls,c),'data')
        else:
            g,ls,c=lax.psum((g,ls,c),'data')
        g=jax.tree.map(lambda a:a/jnp.maximum(c,1.),g)
        params,opt_state=opt_adam_update(g,params,opt_state,lr=1e-3,weight_decay=0.01)
        return params,opt_state,metrics+jnp.stack([ls,c])
    rp,dp=P(),P('data')
    return jax.jit(jax.shard_map(local,mesh=mesh,in_specs=(rp,rp,rp,rp,dp,dp,dp,dp),out_specs=(rp,rp,rp),check_vma=check_vma),donate_argnums=(0,1,2))
variants={**variants,'shmap_auto':mk(True,True),'shmap_novma':mk(False,False)}
state={k:args() for k in variants}
for r in range(3):
  for k,f in variants.items():
    a=state[k]; a=f(*a,*data); jax.block_until_ready(a)
    t=time.perf_counter()
    for i in range(8): a=f(*a,*data)
    jax.block_until_ready(a); state[k]=a
    print(r,k,f"{(time.perf_counter()-t)/8*1e3:.1f} ms",flush=True)
# equality of one step between variants
outs={k:f(*args(),*data) for k,f in variants.items()}
ref=outs['jit_body'][0]
for k,o in outs.items():
    print(k, max(float(jnp.abs(a-b).max()) for a,b in zip(jax.tree.leaves(o[0]),jax.tree.leaves(ref))))

"""Pipelines with the diffusers API. Import the submodule you need (it imports diffusers):

    from nunchaku.pipelines import flux as nunchaku_flux
"""

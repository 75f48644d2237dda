/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* libvirt, loaded on first use (dl.c).  Include after <libvirt/libvirt.h>:
 * each libvirt function nkp calls becomes a call through a sym_ pointer
 * that nkp_dlopen_libvirt() fills, so libnkp.so and the programs carry no
 * DT_NEEDED on libvirt.so.0.  A libvirt call not listed here is left
 * undefined, and libnkp.so's -Wl,--no-undefined link fails on it: add the
 * function to both lists below. */
#ifndef NKP_DL_LIBVIRT_H
#define NKP_DL_LIBVIRT_H

#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>

#define NKP_LIBVIRT_SYMBOLS(X)                  \
        X(virConnectClose)                      \
        X(virConnectDomainEventDeregisterAny)   \
        X(virConnectDomainEventRegisterAny)     \
        X(virConnectListAllDomains)             \
        X(virConnectOpen)                       \
        X(virConnectRegisterCloseCallback)      \
        X(virConnectSetKeepAlive)               \
        X(virConnectUnregisterCloseCallback)    \
        X(virDomainBackupBegin)                 \
        X(virDomainBackupGetXMLDesc)            \
        X(virDomainBlockCopy)                   \
        X(virDomainBlockJobAbort)               \
        X(virDomainCheckpointFree)              \
        X(virDomainCheckpointLookupByName)      \
        X(virDomainCreate)                      \
        X(virDomainCreateXML)                   \
        X(virDomainDefineXML)                   \
        X(virDomainFree)                        \
        X(virDomainGetBlockInfo)                \
        X(virDomainGetBlockJobInfo)             \
        X(virDomainGetJobInfo)                  \
        X(virDomainGetJobStats)                 \
        X(virDomainGetMetadata)                 \
        X(virDomainGetName)                     \
        X(virDomainGetUUIDString)               \
        X(virDomainGetXMLDesc)                  \
        X(virDomainHasManagedSaveImage)         \
        X(virDomainIsActive)                    \
        X(virDomainLookupByName)                \
        X(virDomainLookupByUUIDString)          \
        X(virDomainListAllSnapshots)            \
        X(virDomainManagedSaveGetXMLDesc)       \
        X(virDomainSetMetadata)                 \
        X(virDomainSnapshotCreateXML)           \
        X(virDomainSnapshotCurrent)             \
        X(virDomainSnapshotFree)                \
        X(virDomainSnapshotGetName)             \
        X(virDomainSnapshotGetXMLDesc)          \
        X(virDomainSnapshotLookupByName)        \
        X(virEventAddHandle)                    \
        X(virEventAddTimeout)                   \
        X(virEventRegisterDefaultImpl)          \
        X(virEventRemoveHandle)                 \
        X(virEventRemoveTimeout)                \
        X(virEventRunDefaultImpl)               \
        X(virEventUpdateTimeout)                \
        X(virGetLastError)                      \
        X(virSecretDefineXML)                   \
        X(virSecretFree)                        \
        X(virSecretGetXMLDesc)                  \
        X(virSecretLookupByUUIDString)          \
        X(virSecretSetValue)                    \
        X(virSecretUndefine)                    \
        X(virSetErrorFunc)                      \
        X(virTypedParamsFree)                   \
        X(virTypedParamsGetInt)                 \
        X(virTypedParamsGetString)

#define NKP_DL_EXTERN(f) extern __typeof__(f) *sym_##f;
NKP_LIBVIRT_SYMBOLS(NKP_DL_EXTERN)

/* Loads libvirt.so.0 and resolves every symbol above, once per process
 * (thread-safe).  0, or -ELIBACC with one line naming the library and the
 * package to install (nkp_error_message()). */
int nkp_dlopen_libvirt(void);

#ifndef NKP_DL_NO_REDIRECT
#define virConnectClose sym_virConnectClose
#define virConnectDomainEventDeregisterAny sym_virConnectDomainEventDeregisterAny
#define virConnectDomainEventRegisterAny sym_virConnectDomainEventRegisterAny
#define virConnectListAllDomains sym_virConnectListAllDomains
#define virConnectOpen sym_virConnectOpen
#define virConnectRegisterCloseCallback sym_virConnectRegisterCloseCallback
#define virConnectSetKeepAlive sym_virConnectSetKeepAlive
#define virConnectUnregisterCloseCallback sym_virConnectUnregisterCloseCallback
#define virDomainBackupBegin sym_virDomainBackupBegin
#define virDomainBackupGetXMLDesc sym_virDomainBackupGetXMLDesc
#define virDomainBlockCopy sym_virDomainBlockCopy
#define virDomainBlockJobAbort sym_virDomainBlockJobAbort
#define virDomainCheckpointFree sym_virDomainCheckpointFree
#define virDomainCheckpointLookupByName sym_virDomainCheckpointLookupByName
#define virDomainCreate sym_virDomainCreate
#define virDomainCreateXML sym_virDomainCreateXML
#define virDomainDefineXML sym_virDomainDefineXML
#define virDomainFree sym_virDomainFree
#define virDomainGetBlockInfo sym_virDomainGetBlockInfo
#define virDomainGetBlockJobInfo sym_virDomainGetBlockJobInfo
#define virDomainGetJobInfo sym_virDomainGetJobInfo
#define virDomainGetJobStats sym_virDomainGetJobStats
#define virDomainGetMetadata sym_virDomainGetMetadata
#define virDomainGetName sym_virDomainGetName
#define virDomainGetUUIDString sym_virDomainGetUUIDString
#define virDomainGetXMLDesc sym_virDomainGetXMLDesc
#define virDomainHasManagedSaveImage sym_virDomainHasManagedSaveImage
#define virDomainIsActive sym_virDomainIsActive
#define virDomainLookupByName sym_virDomainLookupByName
#define virDomainLookupByUUIDString sym_virDomainLookupByUUIDString
#define virDomainListAllSnapshots sym_virDomainListAllSnapshots
#define virDomainManagedSaveGetXMLDesc sym_virDomainManagedSaveGetXMLDesc
#define virDomainSetMetadata sym_virDomainSetMetadata
#define virDomainSnapshotCreateXML sym_virDomainSnapshotCreateXML
#define virDomainSnapshotCurrent sym_virDomainSnapshotCurrent
#define virDomainSnapshotFree sym_virDomainSnapshotFree
#define virDomainSnapshotGetName sym_virDomainSnapshotGetName
#define virDomainSnapshotGetXMLDesc sym_virDomainSnapshotGetXMLDesc
#define virDomainSnapshotLookupByName sym_virDomainSnapshotLookupByName
#define virEventAddHandle sym_virEventAddHandle
#define virEventAddTimeout sym_virEventAddTimeout
#define virEventRegisterDefaultImpl sym_virEventRegisterDefaultImpl
#define virEventRemoveHandle sym_virEventRemoveHandle
#define virEventRemoveTimeout sym_virEventRemoveTimeout
#define virEventRunDefaultImpl sym_virEventRunDefaultImpl
#define virEventUpdateTimeout sym_virEventUpdateTimeout
#define virGetLastError sym_virGetLastError
#define virSecretDefineXML sym_virSecretDefineXML
#define virSecretFree sym_virSecretFree
#define virSecretGetXMLDesc sym_virSecretGetXMLDesc
#define virSecretLookupByUUIDString sym_virSecretLookupByUUIDString
#define virSecretSetValue sym_virSecretSetValue
#define virSecretUndefine sym_virSecretUndefine
#define virSetErrorFunc sym_virSetErrorFunc
#define virTypedParamsFree sym_virTypedParamsFree
#define virTypedParamsGetInt sym_virTypedParamsGetInt
#define virTypedParamsGetString sym_virTypedParamsGetString
#endif

#endif

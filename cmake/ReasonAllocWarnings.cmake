# Warnings and sanitizers for the project's own targets (never for generated code).
# With clang, -Wthread-safety checks every ABSL_GUARDED_BY / ABSL_*_LOCKS_* annotation (an error
# with REASONALLOC_WERROR, as every other warning).
function(reasonalloc_target_options target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wnon-virtual-dtor>
    $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<CXX_COMPILER_ID:GNU>>:-Wshadow=local>
    $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<CXX_COMPILER_ID:Clang>>:-Wthread-safety -Wshadow-uncaptured-local>
    $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<BOOL:${REASONALLOC_WERROR}>>:-Werror>
    $<$<AND:$<COMPILE_LANGUAGE:CUDA>,$<BOOL:${REASONALLOC_WERROR}>>:-Werror=all-warnings>
    $<$<AND:$<COMPILE_LANGUAGE:CUDA>,$<BOOL:${REASONALLOC_WERROR}>>:-Xcompiler=-Wall,-Wextra,-Werror>)
  if(REASONALLOC_SANITIZE)
    target_compile_options(${target} PRIVATE
      $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=${REASONALLOC_SANITIZE} -fno-omit-frame-pointer>)
    target_link_options(${target} PRIVATE -fsanitize=${REASONALLOC_SANITIZE})
  endif()
endfunction()
